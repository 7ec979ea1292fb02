"""The SecAgg+ ClientApp as the Flower app (FAB) ships it: ``seekdeep fl`` copies this file into
the app directory, so the ClientApp processes of SecAgg+'s key-exchange and unmask stages (three
of its four messages a round) start without importing torch or seekdeep; only the stage that
trains does (through ``client_fn``). Standalone on purpose: it imports Flower only."""

from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp


def client_fn(context):
    from seekdeep.fl.app.secagg import client_fn as train_client_fn

    return train_client_fn(context)


client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
