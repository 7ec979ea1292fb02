"""The embedded multimodal default: synthetic scenes of coloured shapes rendered with PIL, and
questions about them with known answers. Nothing is stored; every scene is generated from
``(seed, split, index)``, so a split is the same on every machine.

Question types (answers are single words):

- ``spatial``: "which side of the red circle is the blue square ?" -> left / right / above / below
  (the two objects differ clearly along one axis);
- ``shape``: "what shape is the green object ?" -> circle / square / triangle;
- ``exist``: "is there a yellow triangle ?" -> yes / no (balanced);
- ``count``: "how many objects are there ?" -> two / three / four.

Two more types are training aids, never in the default mix (:data:`AUX_TYPES`): ``column``
("which column is the red circle in ?" -> one .. four, counted from the left) and ``row``
(counted from the top). Each is half of a spatial question -- find the named object, read its
position -- with its own answer, so a model gets credit for the binding before it can compare.

A grounded answer (:func:`grounded_answer`, opt-in in the recipe) spells a spatial answer out
as one-hop steps before the side -- "which side of the red circle is the blue square ?" ->
"red one two blue three two right": each named object's colour, column and row, then the
answer, which the model must still produce itself (it is scored on that last word only).

Splits: ``train`` and ``test`` (i.i.d.) never contain the :data:`HELD_OUT` colour-shape
combinations; ``heldout`` scenes each contain at least one of them, and its questions name
such an object wherever the question type allows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

from seekdeep.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
                      ("purple", "circle"), ("orange", "square")})
QUESTION_TYPES = ("spatial", "shape", "exist", "count")
AUX_TYPES = ("column", "row")  # training aids: where the named object is (see the module docstring)
POSITION_WORDS = ("one", "two", "three", "four")  # a grid column / row, counted from the left / top
ANSWERS = {
    "spatial": ("left", "right", "above", "below"),
    "shape": SHAPES,
    "exist": ("yes", "no"),
    "count": ("two", "three", "four"),
    "column": POSITION_WORDS,
    "row": POSITION_WORDS,
}
SPLITS = {"train": 0, "test": 1, "heldout": 2}
_GRID = 4  # objects sit in the cells of a GRID x GRID layout, jittered
_BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    col: int
    row: int


@dataclass(frozen=True)
class VQASample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: tuple[SceneObject, ...]


def vocabulary() -> list[str]:
    """Every word a question or answer can use (for a word-level tokenizer)."""
    words = {"which", "side", "of", "the", "is", "a", "what", "shape", "object", "there", "how", "many", "objects", "are", "?", "question:", "answer:",
             "column", "row", "in"}
    words |= set(COLOURS) | set(SHAPES) | set(POSITION_WORDS) | {"caption:"}
    for answers in ANSWERS.values():
        words |= set(answers)
    return sorted(words)


def grounded_answer(sample: VQASample) -> str:
    """The answer with the positions it rests on: for a spatial question, 'colour column row'
    of the reference then of the object, then the side; other types: the plain answer."""
    if sample.qtype != "spatial":
        return sample.answer
    words = sample.question.split()  # which side of the <colour> <shape> is the <colour> <shape> ?
    by_colour = {o.colour: o for o in sample.objects}  # colours are distinct within a scene
    ref, obj = by_colour[words[4]], by_colour[words[8]]
    steps = [f"{o.colour} {POSITION_WORDS[o.col]} {POSITION_WORDS[o.row]}" for o in (ref, obj)]
    return " ".join(steps + [sample.answer])


class SpatialVQA:
    """``SpatialVQA(split, seed, image_size)[i]`` -> :class:`VQASample`, deterministic."""

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 48, qtypes: tuple[str, ...] = QUESTION_TYPES):
        if split not in SPLITS:
            raise ConfigError("split", f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if not isinstance(image_size, int) or image_size < 16 or image_size % _GRID:
            raise ConfigError("image_size", f"must be an integer >= 16 divisible by {_GRID}, got {image_size!r}")
        bad = [q for q in qtypes if q not in QUESTION_TYPES + AUX_TYPES]
        if bad or not qtypes:
            raise ConfigError("qtypes", f"unknown question type {bad[:1]}; accepted: {', '.join(QUESTION_TYPES + AUX_TYPES)}")
        self.split, self.seed, self.image_size, self.qtypes = split, seed, image_size, tuple(qtypes)

    def __getitem__(self, index: int) -> VQASample:
        rng = random.Random(f"{self.seed}:{SPLITS[self.split]}:{index}")
        qtype = self.qtypes[index % len(self.qtypes)]  # balanced over types
        while True:
            objects = self._scene(rng)
            made = self._question(rng, qtype, objects)
            if made is not None:
                question, answer = made
                return VQASample(self.render(objects, rng), question, answer, qtype, objects)

    def __iter__(self) -> Iterator[VQASample]:
        i = 0
        while True:
            yield self[i]
            i += 1

    def take(self, n: int) -> list[VQASample]:
        return [self[i] for i in range(n)]

    # -- scenes
    @staticmethod
    def caption(objects: tuple[SceneObject, ...]) -> str:
        """Every object as 'colour column row shape' (column and row as words), in drawing order."""
        return " ".join(f"{o.colour} {POSITION_WORDS[o.col]} {POSITION_WORDS[o.row]} {o.shape}" for o in objects)

    def _scene(self, rng: random.Random) -> tuple[SceneObject, ...]:
        n = rng.choice((2, 3, 4))
        colours = rng.sample(sorted(COLOURS), n)  # distinct colours: "the red object" is unique
        cells = rng.sample([(c, r) for c in range(_GRID) for r in range(_GRID)], n)
        objects = []
        for colour, (col, row) in zip(colours, cells):
            allowed = list(SHAPES) if self.split == "heldout" else [s for s in SHAPES if (colour, s) not in HELD_OUT]
            objects.append(SceneObject(colour, rng.choice(allowed), col, row))
        if self.split == "heldout" and not any((o.colour, o.shape) in HELD_OUT for o in objects):
            i = rng.randrange(n)
            shape = next(s for s in SHAPES if (objects[i].colour, s) in HELD_OUT)
            objects[i] = SceneObject(objects[i].colour, shape, objects[i].col, objects[i].row)
        return tuple(objects)

    def render(self, objects: tuple[SceneObject, ...], rng: random.Random) -> Image.Image:
        size = self.image_size
        cell = size // _GRID
        radius = cell * 0.38
        image = Image.new("RGB", (size, size), _BACKGROUND)
        draw = ImageDraw.Draw(image)
        jitter = max(1, cell // 8)
        for o in objects:
            cx = o.col * cell + cell / 2 + rng.randint(-jitter, jitter)
            cy = o.row * cell + cell / 2 + rng.randint(-jitter, jitter)
            fill = COLOURS[o.colour]
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if o.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif o.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        return image

    # -- questions
    def _focus(self, objects):
        """The objects a held-out question should name first."""
        held = [o for o in objects if (o.colour, o.shape) in HELD_OUT]
        return held if self.split == "heldout" and held else list(objects)

    def _question(self, rng: random.Random, qtype: str, objects) -> tuple[str, str] | None:
        if qtype == "spatial":
            focus = self._focus(objects)
            pairs = [(a, b) for a in objects for b in objects if a is not b and abs(a.col - b.col) != abs(a.row - b.row)
                     and (a in focus or b in focus)]
            if not pairs:
                return None
            ref, obj = rng.choice(pairs)
            dx, dy = obj.col - ref.col, obj.row - ref.row
            answer = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
            return f"which side of the {ref.colour} {ref.shape} is the {obj.colour} {obj.shape} ?", answer
        if qtype in AUX_TYPES:
            o = rng.choice(self._focus(objects))
            return f"which {qtype} is the {o.colour} {o.shape} in ?", POSITION_WORDS[o.col if qtype == "column" else o.row]
        if qtype == "shape":
            o = rng.choice(self._focus(objects))
            return f"what shape is the {o.colour} object ?", o.shape
        if qtype == "exist":
            present = {(o.colour, o.shape) for o in objects}
            if rng.random() < 0.5:
                colour, shape = (o := rng.choice(self._focus(objects))).colour, o.shape
                answer = "yes"
            else:
                allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                           and ((c, s) in HELD_OUT) == (self.split == "heldout")]
                colour, shape = rng.choice(sorted(allowed))
                answer = "no"
            return f"is there a {colour} {shape} ?", answer
        return "how many objects are there ?", ANSWERS["count"][len(objects) - 2]
