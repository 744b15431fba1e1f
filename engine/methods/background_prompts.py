"""Background descriptions for AGA: instruction x scene x time-of-day/season templates, and output cleaning.

AGA ("Data Augmentation for Image Classification using Generative AI") asks an LLM for diverse one-line
background descriptions. Diversity comes from composing the instruction from three template lists; the LLM
turns the composed instruction into a description. No object of the dataset's classes may appear in it, or
the generated background would contain a second, competing subject.

Pure Python on purpose: the transformers actor and a vLLM stage share this engine, so for a given row seed
both ask the same question and accept the same answers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

INSTRUCTIONS: tuple[str, ...] = (
    "Describe, in one line, a photo background of",
    "Write a single vivid sentence describing an empty photograph of",
    "In one short line, describe the scenery of a picture taken in",
    "Give a one-line description, as a photographer would, of the backdrop of",
    "Write one line describing the landscape and light of a photo of",
)

# Places, not things: each is a backdrop a subject could stand in front of.
SCENES: tuple[str, ...] = (
    "a quiet beach",
    "a dense pine forest",
    "a busy city street",
    "a mountain meadow full of wildflowers",
    "a snowy field",
    "a desert with rolling sand dunes",
    "a rocky coastline",
    "a golden wheat field",
    "a public park with green lawns",
    "the shore of a calm lake",
    "a riverbank with tall grass",
    "a cozy living room",
    "a clean kitchen",
    "a cobblestone alley in an old town",
    "a tropical rainforest clearing",
    "a rooftop terrace overlooking a skyline",
    "a winding country road",
    "a small fishing harbor",
    "a flower garden with a gravel path",
    "a red rock canyon",
    "a frozen lake surrounded by hills",
    "a quiet library with wooden shelves",
    "an empty train station platform",
    "a vineyard on a gentle slope",
    # More places, in other words: a dataset's class names forbid some words (Food-101's "spring_rolls",
    # CUB's "Field Sparrow", ImageNet's "park bench"), and the pool must still hold enough scenes.
    "an open grassland under a wide sky",
    "a terraced hillside of rice paddies",
    "a sunlit courtyard",
    "a misty moor",
    "a lavender farm in bloom",
    "a dry salt plain stretching to the horizon",
    "a bamboo grove",
    "a tea plantation on rolling hills",
    "a quiet cloister",
    "a sunny plaza in a southern town",
    "a wide prairie",
    "an alpine pasture",
    "a glacier lagoon",
    "a moss-covered ravine",
    "a canal lined with brick buildings",
    "an empty concert hall",
    "a modern office lobby",
    "a sunlit attic",
    "a quiet museum gallery",
    "a sandy riverbed",
    "a savanna with scattered acacias",
    "a birch grove",
    "a tidal marsh",
    "a highland plateau",
    "a sunflower meadow",
    "a quiet village square",
    "a wide dune landscape",
    "a windswept high pass",
    "a marble hallway",
    "a boardwalk through the dunes",
    "an empty gymnasium",
    "a sunny balcony",
    "an art studio with skylights",
    "a hotel corridor",
    "a misty bog",
    "a riverside promenade",
    "a lush fern gully",
    "an open heath",
    "a mossy glade",
    "a pebble shore",
    "a grand staircase",
    "an airport terminal",
    "a steep scree slope",
    "a badlands landscape",
    "an olive grove",
    "a cherry orchard",
    "a palm-lined avenue",
    "a limestone karst landscape",
    "an abandoned factory hall",
    "a snowy tundra",
    "a misty fjord",
    "a sunlit loft apartment",
    "a disused quarry",
    "a mangrove swamp",
    "a coastal heathland",
)

TIMES: tuple[str, ...] = (
    "at sunrise in spring",
    "at sunset in summer",
    "at noon on a clear summer day",
    "on a foggy autumn morning",
    "on a snowy winter evening",
    "at dusk in late autumn",
    "at night under a full moon",
    "on an overcast spring afternoon",
    "at golden hour in early autumn",
    "on a rainy afternoon in spring",
    "on a crisp winter morning",
    "at twilight in midsummer",
    "on a windy autumn afternoon",
    "in the blue hour of a winter evening",
    "on a hazy summer morning",
    # Without a season or a colour: still there when class names forbid "spring", "winter" or "golden".
    "at sunrise",
    "at dawn",
    "in the early morning",
    "at midday",
    "in the late afternoon",
    "at dusk",
    "at sundown",
    "under a starry sky",
    "under an overcast sky",
    "after a passing shower",
    "in soft morning haze",
    "in bright midday sun",
    "under dramatic storm clouds",
    "before dawn",
    "in thick fog",
    "during a drizzle",
    "on a calm clear morning",
    "under a pale sky",
    "in a heavy downpour",
    "under scattered clouds",
    "in the calm after a storm",
    "on a breezy afternoon",
    "on a still, humid afternoon",
    "under a hazy sky",
    "on a warm, windless day",
    "in the quiet hour before sunrise",
    "as the sun sets",
    "as the sun rises",
    "on a cold, clear day",
    "under low clouds",
    "under a cloudless sky",
)

# Last resorts when every template of a pool holds a forbidden word: plain settings, then none at all
# (the instruction still asks for a background). Each use is counted in `BackgroundPromptEngine.shortfalls`.
NEUTRAL_SCENES: tuple[str, ...] = ("an open outdoor space", "a plain studio backdrop", "somewhere quiet")

# Closes every composed instruction: the model should describe a place, not add a subject to it.
INSTRUCTION_SUFFIX = (
    "Describe only the place and its light; no people, animals or objects in the foreground. "
    "Answer with the description only."
)

# Appended to the template-only fallback so it reads like a photo prompt.
FALLBACK_STYLES: tuple[str, ...] = (
    "empty scene, natural light, realistic photograph",
    "wide shot, nothing in the foreground, detailed photo",
    "soft light, calm atmosphere, high quality photo",
    "sharp focus, rich colors, professional photograph",
    "wide angle, realistic photograph",
    "high quality photo, soft focus",
)

# Words of a multiword class name that say nothing about the class: forbidding them would reject nearly
# every sentence ("lady of the lake" must not forbid "the").
_STOPWORDS = frozenset(
    "a an the of and or in on at to for with by from as is are be its it this that de la le del du".split()
)
_IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "fish": "fish",
    "sheep": "sheep",
}
_WORD = re.compile(r"[^\W_]+")

# Chat-template debris some models (or some decodings) leave in the text.
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SPECIAL_TOKEN = re.compile(
    r"<\|[^|>]*\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<pad>|<unk>", re.IGNORECASE
)
_LEADING_LABEL = re.compile(
    r"^(?:#+\s*)?(?:assistant|user|system|model|response|answer|output|background(?:\s+description)?"
    r"|description|scene|prompt|caption|setting)\s*[:\-\u2013\u2014]\s*",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^(?:[-*\u2022]+|\d+[.)])\s+")
_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|okay|ok|here(?: is|'s| are))\b", re.IGNORECASE)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def _stable_int(*parts: object) -> int:
    """A hash that is the same in every process and Python version (unlike `hash()`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def word_forms(word: str) -> set[str]:
    """`word` and its likely plural/singular forms, lower case ("cat" -> {"cat", "cats", "cates"})."""
    w = word.lower()
    forms = {w, w + "s", w + "es"}
    if w in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[w])
    if w.endswith("man"):
        forms.add(w[:-3] + "men")
    if len(w) > 2 and w.endswith("y") and w[-2] not in "aeiou":
        forms.add(w[:-1] + "ies")
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")
    elif w.endswith("f"):
        forms.add(w[:-1] + "ves")
    # Class names are often plural already ("sneakers", "berries"): forbid the singular too.
    if len(w) > 3 and w.endswith("ies"):
        forms.add(w[:-3] + "y")
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
    return forms


def forbidden_terms(names: Iterable[str]) -> list[str]:
    """Regex alternatives for names: each whole name (as a phrase) and each of its content words."""
    terms: set[str] = set()
    for name in names:
        words = _WORD.findall(name.lower())
        if not words:
            continue
        # The phrase, with any separators between its words ("sea lion", "sea-lion", "sea_lion").
        *head, last = words
        for form in word_forms(last):
            terms.add(r"[\W_]+".join([*map(re.escape, head), re.escape(form)]))
        for word in words:
            # A name's single letters and numbers ("T-shirt", "001.Black_footed_Albatross") say nothing.
            if len(words) == 1 or (word not in _STOPWORDS and len(word) > 1 and not word.isdigit()):
                terms.update(re.escape(form) for form in word_forms(word))
    return sorted(terms, key=lambda t: (-len(t), t))


def dataset_forbidden_words(
    class_names: Iterable[str], superclasses: dict[str, str] | None = None, extra: Iterable[str] = ()
) -> list[str]:
    """Every class name, every superclass name and the configured extras (the engine splits their words)."""
    return sorted({*class_names, *(superclasses or {}).values(), *extra})


@dataclass(frozen=True)
class ComposedInstruction:
    """One LLM request: the pieces picked for a seed and the user message built from them."""

    seed: int
    instruction: str
    scene: str
    time: str
    text: str  # the user message for the LLM

    @property
    def setting(self) -> str:
        return " ".join(p for p in (self.scene, self.time) if p)

    @property
    def messages(self) -> list[dict[str, str]]:
        """Chat messages for `apply_chat_template` or an OpenAI-style API (one user turn: some
        chat templates reject a system role)."""
        return [{"role": "user", "content": self.text}]


class BackgroundPromptEngine:
    """Composes background instructions, cleans LLM answers and writes template-only fallbacks.

    forbidden_words: class names, superclass names and extras; multiword names also forbid their words.
    Scene/time/style templates that contain a forbidden word are dropped before the first `num_*` are taken.
    When fewer remain than asked for, all that remain are used; when none remain, a neutral setting (or
    none) is used. Never an error: `shortfalls` counts the templates missing per pool and `notes` says so.
    """

    @classmethod
    def from_config(cls, config, class_names: list[str], superclasses: dict[str, str] | None = None):
        """From a `PromptConfig`: its template sizes or the domain's own scene/time/style words (used whole),
        and the dataset's class words forbidden."""
        scenes, times, styles = config.scenes, config.times, config.styles
        return cls(
            num_instructions=config.num_instructions,
            num_scenes=config.num_scenes if scenes is None else len(scenes),
            num_times=config.num_times if times is None else len(times),
            forbidden_words=dataset_forbidden_words(class_names, superclasses, config.extra_forbidden_words),
            scenes=SCENES if scenes is None else scenes,
            times=TIMES if times is None else times,
            styles=FALLBACK_STYLES if styles is None else styles,
        )

    def __init__(
        self,
        num_instructions: int = 3,
        num_scenes: int = 18,
        num_times: int = 13,
        forbidden_words: Sequence[str] = (),
        *,
        min_words: int = 3,
        max_chars: int = 300,
        instructions: Sequence[str] = INSTRUCTIONS,
        scenes: Sequence[str] = SCENES,
        times: Sequence[str] = TIMES,
        styles: Sequence[str] = FALLBACK_STYLES,
    ) -> None:
        self.forbidden_words = sorted({w.strip() for w in forbidden_words if w and w.strip()})
        terms = forbidden_terms(self.forbidden_words)
        # `(?!\w)` rather than a trailing `\b`, so a term ending in a non-word char still needs a boundary.
        self._forbidden = (
            re.compile(r"\b(?:" + "|".join(terms) + r")(?!\w)", re.IGNORECASE) if terms else None
        )
        self.min_words = min_words
        self.max_chars = max_chars

        self.shortfalls: dict[str, int] = {}  # pool -> templates missing after filtering
        self.instructions = self._take("instruction", list(instructions), num_instructions, len(instructions))
        self.scenes = self._take("scene", self._allowed(scenes), num_scenes, len(scenes))
        if not self.scenes:
            self.scenes = self._allowed(NEUTRAL_SCENES)[:1] or [""]
        # No time words at all (a domain without them, `times: []`) is a choice, not a shortfall.
        self.times = self._take("time", self._allowed(times), num_times, len(times)) if times else []
        if not self.times:
            self.times = [""]
        self.styles = self._allowed(styles)
        for note in self.notes:  # once per actor: the shortfall is the dataset's, not a row's
            logger.warning(note)

    @property
    def notes(self) -> list[str]:
        """One line per pool that came up short, for logs and the run report."""
        notes = []
        for kind, missing in sorted(self.shortfalls.items()):
            pool = self.scenes if kind == "scene" else self.times
            usable = [t for t in pool if t and t not in NEUTRAL_SCENES]
            instead = "" if usable else (f" ({pool[0]!r} instead)" if pool[0] else " (none instead)")
            notes.append(
                f"prompt {kind} templates: {missing} fewer than asked for, dropped for holding a class "
                f"word; {len(usable)} used{instead}"
            )
        return notes

    @property
    def num_combinations(self) -> int:
        return len(self.instructions) * len(self.scenes) * len(self.times)

    def contains_forbidden(self, text: str) -> bool:
        """Whole-word, case-insensitive; plural/singular forms count ("cats" for "cat")."""
        return self._forbidden is not None and self._forbidden.search(text) is not None

    def compose(self, seed: int) -> ComposedInstruction:
        """Pick instruction, scene and time from the seed: the same seed always asks the same question."""
        index = _stable_int("compose", int(seed)) % self.num_combinations
        index, i_time = divmod(index, len(self.times))
        i_instruction, i_scene = divmod(index, len(self.scenes))
        instruction = self.instructions[i_instruction]
        scene, time = self.scenes[i_scene], self.times[i_time]
        # Empty pieces (a pool with no usable template) leave no double spaces.
        text = " ".join(p for p in (instruction, scene, time) if p) + f". {INSTRUCTION_SUFFIX}"
        return ComposedInstruction(int(seed), instruction, scene, time, text)

    def fallback(self, seed: int) -> str:
        """Template-only description for the seed's scene and time; never contains a forbidden word."""
        composed = self.compose(seed)
        style = self.styles[_stable_int("style", int(seed)) % len(self.styles)] if self.styles else ""
        # Pieces were filtered one by one; a multiword name made only of stopwords could still form across
        # a join, so the first candidate free of forbidden words wins.
        candidates = (", ".join(p for p in (composed.setting, style) if p), composed.setting, composed.scene)
        return next((text for text in candidates if not self.contains_forbidden(text)), "")

    def clean(self, text: str | None) -> str | None:
        """One clean line from raw LLM output, or None when it is unusable (empty, too short, forbidden)."""
        if not isinstance(text, str):
            return None
        text = _THINK_BLOCK.sub(" ", text)
        if re.search(r"<think>", text, re.IGNORECASE):
            return None  # an unfinished reasoning block: no answer was given
        text = _SPECIAL_TOKEN.sub("\n", text).replace("\ufffd", "")
        text = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t ")
        line = _first_content_line(text.replace("_", " ").replace("**", ""))
        if line is None:
            return None
        line = _truncate(" ".join(line.split()), self.max_chars)
        words = line.split()
        letters = sum(ch.isalpha() for ch in line)
        if len(words) < self.min_words or letters < len(line.replace(" ", "")) / 2:
            return None
        if self.contains_forbidden(line):
            return None
        return line

    def _allowed(self, templates: Iterable[str]) -> list[str]:
        return [t for t in templates if not self.contains_forbidden(t)]

    def _take(self, kind: str, allowed: list[str], wanted: int, total: int) -> list[str]:
        """The first `wanted` allowed templates. Asking for more than exist is a config error; fewer left
        after the class-word filter is the dataset's doing: take what is left and count the shortfall."""
        if wanted < 1:
            raise ValueError(f"num {kind}s must be >= 1, got {wanted}")
        if wanted > total:
            raise ValueError(f"asked for {wanted} {kind} templates but only {total} exist")
        if wanted > len(allowed):
            self.shortfalls[kind] = wanted - len(allowed)
        return allowed[:wanted]


def _strip_decorations(line: str) -> str:
    """Remove bullets, labels ("Background:") and surrounding quotes until nothing changes."""
    previous = None
    while line != previous:
        previous = line
        line = line.strip().strip(_QUOTES).strip()
        line = _BULLET.sub("", line)
        line = _LEADING_LABEL.sub("", line)
    return line


def _first_content_line(text: str) -> str | None:
    lines = [_strip_decorations(raw) for raw in text.splitlines()]
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        # "Sure! Here is a description:" introduces the answer on the next line.
        if not is_last and (line.endswith(":") or _PREAMBLE.match(line)):
            continue
        return line
    return None


def _truncate(line: str, max_chars: int) -> str:
    if len(line) <= max_chars:
        return line
    cut = line[: max_chars + 1].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:-")
