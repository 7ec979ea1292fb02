"""The Flower apps of ``seekdeep fl`` (importing this package imports Flower): ``server`` /
``client`` (Message API, packed Paillier or plaintext) and ``secagg`` (Flower's SecAgg+, on its
legacy strategy API)."""
