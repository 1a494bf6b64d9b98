"""The structured config of every loft_dist command: dataclasses + omegaconf, validated before Ray starts.

The dataclass defaults are the embedded tiny run (offline, minutes on 2 CPU cores); the paper
settings in `configs/*.yaml` override them. Every command takes a YAML file plus `key=value`
overrides (omegaconf dotlist).

A field's own constraints (bounds, choices, whether it may change on resume) sit beside it in `setting(...)`
and are checked by one function; rules that tie fields together are each section's `check()`, right below it.
This module imports nothing from loft_dist but its errors: every other layer reads the config, not the reverse.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loft_dist.errors import ConfigError  # noqa: F401 - re-exported: most modules import it from here

log = logging.getLogger(__name__)
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default: Any, *, ge=None, gt=None, le=None, lt=None, choices: Optional[tuple] = None,
            items: Optional[tuple] = None, resumable: bool = False, hint: str = ""):
    """A config field with its constraints, checked by `_check_fields` (None passes where the field is Optional).

    ge/gt/le/lt: bounds of a number; choices: the allowed values; items: the allowed values of a list's items;
    resumable: may differ between a run and its resume (where it runs, not what it computes); hint: what is
    allowed, in the user's words, for the error message (default: the choices or the bounds)."""
    given = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "items": items,
             "resumable": resumable or None, "hint": hint or None}
    meta = {k: v for k, v in given.items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A rule across fields: the key to change, its value, and what is allowed given the others."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


# --------------------------------------------------------------------------------------------
# the methods behind algorithm.name: which values a name implies (the code of each is in loft_dist/algorithms)
# --------------------------------------------------------------------------------------------
ADAPTERS = ("lora", "adaptformer", "vpt", "bitfit", "ln")  # peft.method values that add a light adapter
STRONG_AUGS = ("randaugment_mc", "torchvision")  # data.strong_aug: FixMatch's RandAugmentMC, or torchvision's


@dataclass(frozen=True)
class Method:
    module: str  # loft_dist.algorithms.<module>: the loss (and, for ulfine, the model)
    summary: str
    trains: bool = True  # zero-shot trains nothing: the run is round 0 only
    pseudo_labels: bool = True  # trains on the pool (offline: the round's accepted rows; online: per step)
    # Config values the name implies, merged beneath the user's YAML and overrides (so either can change them).
    defaults: dict = field(default_factory=dict)
    peft_methods: tuple = ()  # peft.method values the method is defined with (empty = any)
    class_stats: bool = False  # offline rounds start from per-class statistics of the round's table (ULFine's P_u)


METHODS = {
    "zero_shot": Method("supervised", "CLIP zero-shot with the text prototypes; no training", trains=False,
                        pseudo_labels=False),
    "lp": Method("supervised", "linear probe: frozen tower, cosine head only, labeled data only",
                 pseudo_labels=False, defaults={"peft": {"method": "none"}}, peft_methods=("none",)),
    "lft": Method("supervised", "LIFT: light adapter + head, labeled data only, logit-adjusted loss",
                  pseudo_labels=False, peft_methods=ADAPTERS),
    "fft": Method("supervised", "full fine-tuning of the tower + head, labeled data only",
                  pseudo_labels=False, defaults={"peft": {"method": "full"}}, peft_methods=("full",)),
    # FixMatch: c_ood = c_hard leaves no soft band (ties go to hard); plain CE (tau 0); lambda_u 1 as in FixMatch.
    "fixmatch": Method("fixmatch", "FixMatch: hard pseudo-labels at MSP >= 0.95, plain cross-entropy",
                       defaults={"algorithm": {"c_hard": 0.95, "c_ood": 0.95, "lambda_u": 1.0, "lambda_uc": 0.0,
                                               "tau": 0.0}}),
    "loft": Method("loft", "LoFT, closed world: hard + soft pseudo-labels, nothing rejected (SPEC Decision 2)",
                   defaults={"algorithm": {"c_ood": 0.0}}),
    "loft_ow": Method("loft", "LoFT-OW: stage-1 zero-shot filter + stage-2 MSP rejection at c_ood 0.3",
                      defaults={"algorithm": {"c_ood": 0.3, "zs_filter": True}}),
    # ULFine's SSL base is not retrievable (SPEC B.5); the LTSSL norm is FixMatch's hard rule + LA supervised loss.
    "ulfine": Method("ulfine", "ULFine (reconstructed): PAF + orthogonality + dual logit fusion on FixMatch",
                     class_stats=True, defaults={"algorithm": {"c_hard": 0.95, "c_ood": 0.95, "lambda_u": 1.0, "lambda_uc": 0.0}}),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"algorithm.name={name!r}; one of {', '.join(METHODS)}") from None



# --------------------------------------------------------------------------------------------
# the sections: fields with their own constraints; below each, the rules that tie its fields together
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str = "tiny"
    storage_path: str = "runs"  # run dir = <storage_path>/<name>; shared by every node on a cluster
    seed: int = 0
    # None: RAY_ADDRESS if set (ray job submit, KubeRay), else a local Ray
    ray_address: Optional[str] = setting(None, resumable=True)
    num_cpus: Optional[int] = setting(None, resumable=True)  # logical CPUs of a local Ray (None: the machine's count)
    object_store_mb: int = setting(1024, resumable=True)  # cap of a local Ray's object store
    # One driver per run: a second one stops while the first's lease (renewed every timeout / 4) is fresh; a lease
    # older than this is taken over (a killed driver's). Above the longest pause a busy driver may have.
    lease_timeout_s: float = setting(60.0, gt=0, resumable=True)
    # An S3-compatible server (MinIO, Ceph, a test server) for every s3:// location: exported as AWS_ENDPOINT_URL_S3.
    s3_endpoint: str = setting("", resumable=True)


_SOURCES = ("cifar10", "cifar100", "imagefolder", "manifest")  # the sources that read from a path


@dataclass
class DataConfig:
    # The dataset dir (labeled/ unlabeled/ test/ [ood_test/] + dataset.json): a path or a pyarrow URI
    # (file://, s3://, gs://, …); "" = <run dir>/data.
    root: str = ""
    source: str = setting("embedded", choices=("embedded", *_SOURCES))
    source_path: str = ""  # where the source lives (CIFAR dir, ImageFolder root, manifest .csv/.parquet)
    image_size: int = setting(32, ge=8, hint=">= 8 pixels")  # the model's input size; images are resized to it
    # Labeled/unlabeled protocol. lt (SPEC D.1): n_c = floor(N1 * gamma_l^(-c/(C-1))), pool m_c likewise from
    # M1, gamma_u in the order of unlabeled_dist. percent (SPEC D.2): labeled_percent % of each class is
    # labeled (round half up, at least 1), the rest of the class is the pool.
    protocol: str = setting("lt", choices=("lt", "percent"))
    n1: int = setting(40, ge=1)
    gamma_l: float = setting(10.0, ge=1, hint=">= 1 (the imbalance ratio n_1 / n_C)")
    m1: int = setting(80, ge=0)
    gamma_u: float = setting(10.0, ge=1, hint=">= 1 (use data.unlabeled_dist=reversed for a reversed pool)")
    unlabeled_dist: str = setting("consistent", choices=("consistent", "uniform", "reversed"))
    # a percentage: 1.0 = 1 % (LoFT's code writes the same as the fraction 0.01)
    labeled_percent: float = setting(1.0, gt=0, le=100, hint="a percentage in (0, 100]; 1.0 means 1 % of each class")
    labeled_in_unlabeled: bool = False  # the DARP/ACR/LoFT code convention puts labeled images in the pool too
    # Test split: official = the source's own test set (CIFAR's test batch; data.test_path for an ImageFolder
    # tree or a manifest); carve = test_per_class images of each class taken from the training source;
    # auto = official where the source has one, else carve.
    test_source: str = setting("auto", choices=("auto", "official", "carve"))
    test_path: str = ""  # ImageFolder root or manifest of the official test set
    test_per_class: int = 40  # carve only
    # Open world: OOD images (true_label -1) mixed into the pool and, optionally, an ood_test split.
    ood_source: str = setting("generated", choices=("generated", *_SOURCES))
    ood_path: str = ""  # CIFAR dir, any directory of images (searched recursively, e.g. COCO train2017/), or manifest
    # OOD images in the pool; None = ood_ratio decides; -1 = all the source holds
    ood_count: Optional[int] = setting(None, ge=-1, hint="null (use data.ood_ratio), -1 (every image of the OOD "
                                                         "source) or a count >= 0")
    ood_ratio: float = setting(0.25, ge=0)  # OOD images in the pool as a share of the ID pool size (ood_count None)
    # OOD images in the ood_test split (0 = no split); never the same images as the pool's
    ood_test: int = setting(200, ge=0, hint="an integer >= 0 (0 = no ood_test split)")
    ood_image_size: int = 0  # side of generated OOD images; 0 = the ID images' native side (CIFAR: 32), never a size cue
    shard_mb: float = setting(128.0, gt=0, hint="> 0 (megabytes per shard)")  # target shard size
    rows_per_shard: int = setting(256, ge=1)  # cap on rows per shard: more shards = more parallel read tasks
    hflip: bool = False  # horizontal flips in the train views (off for digits; the paper configs turn it on)
    # The strong view's augmentation: FixMatch's RandAugmentMC(2, 10) with its Cutout (SPEC A.0.4), or torchvision's
    # RandAugment(2, 10) + RandomErasing
    strong_aug: str = setting("randaugment_mc", choices=STRONG_AUGS)
    # Classes of the source left out by name (a class with no images, a class not studied); the rest keep their order.
    drop_classes: list = setting([])
    # A protocol that leaves a class with no labeled (or test) image stops prepare, naming the classes, unless this is
    # set (the labeled prior of such a class is 0: the logit-adjusted loss then never predicts it).
    allow_empty_classes: bool = False

    def check(self) -> None:
        d = self
        _need(d.source == "embedded" or bool(d.source_path), "data.source_path", d.source_path,
              f"data.source={d.source} reads from a path; set data.source_path to the "
              + {"cifar10": "directory holding cifar-10-batches-py", "cifar100": "directory holding cifar-100-python",
                 "imagefolder": "ImageFolder root (<root>/<class>/<image>)"}.get(d.source, ".csv or .parquet manifest"))
        has_official_test = d.source in ("cifar10", "cifar100") or bool(d.test_path)
        _need(d.test_source != "official" or has_official_test, "data.test_source", d.test_source,
              "the embedded digits have no official test set; use carve" if d.source == "embedded" else
              f"data.source={d.source} needs data.test_path (ImageFolder root or manifest of the test set); "
              "or use carve")
        _need(not d.test_path or d.source in ("imagefolder", "manifest"), "data.test_path", d.test_path,
              "only read for data.source=imagefolder|manifest (CIFAR's official test batch is found by itself)")
        _need(not d.test_path or d.test_source != "carve", "data.test_path", d.test_path,
              "not read with data.test_source=carve; drop it or use data.test_source=official")
        carves = d.test_source == "carve" or (d.test_source == "auto" and not has_official_test)
        _need(d.test_per_class >= 1 or not carves, "data.test_per_class", d.test_per_class,
              "an integer >= 1 when the test split is carved from the source")
        _need(d.ood_source == "generated" or bool(d.ood_path), "data.ood_path", d.ood_path,
              f"data.ood_source={d.ood_source} reads from a path; set data.ood_path")
        _need(not (d.ood_source == d.source and d.ood_path == d.source_path), "data.ood_path", d.ood_path,
              "the OOD images must come from another source than the ID images (data.source_path)")
        _need(d.ood_count != -1 or d.ood_source != "generated", "data.ood_count", d.ood_count,
              "-1 (every image of the OOD source) needs a finite source; data.ood_source=generated makes any count")
        _need(d.ood_image_size == 0 or d.ood_image_size >= 8, "data.ood_image_size", d.ood_image_size,
              "0 (= the ID images' native side) or >= 8 pixels")


@dataclass
class ModelConfig:
    name: str = "loft-tiny-vit"  # any open_clip model name, or one of loft_dist/models/model_configs
    # "" = random init; an open_clip tag (from the local cache), a .pt/.bin/.safetensors file, or "standin": a CLIP
    # stand-in trained here on reserved digits with noisy captions, not CLIP (loft_dist/models/standin.py)
    pretrained: str = ""
    head_scale: float = 25.0  # s of the cosine classifier
    prompt: str = "a photo of a {}."
    force_quick_gelu: bool = False  # OpenAI weights loaded from a file need QuickGELU
    init_seed: int = 0  # seeds random init, so every process builds the same backbone


@dataclass
class PeftConfig:
    # What trains in the image tower (loft_dist/models/adapters.py); the paper's LoFT uses adaptformer.
    method: str = setting("lora", choices=(*ADAPTERS, "full", "none"))
    # LoRA rank / AdaptFormer bottleneck; 0 = the released code's rule r = 2**max(0, int(log2(C / (2 * n_layers)))).
    r: int = setting(8, ge=0, hint="an integer >= 0 (0 = automatic bottleneck from the number of classes)")
    layers: Optional[list] = None  # block indices that get the adapter (lora, adaptformer, vpt, bitfit, ln); None = all
    alpha: int = 16  # LoRA scaling alpha / r
    dropout: float = setting(0.0, ge=0, lt=1, hint="a probability in [0, 1)")  # LoRA dropout
    # nn.MultiheadAttention ("attn": LoRA on the packed in_proj) and the MLP; out_proj alone gets no gradient.
    target_modules: list = setting(["attn", "mlp.c_fc", "mlp.c_proj"])
    vpt_tokens: int = setting(10, ge=1)  # VPT-deep prompts per block (LIFT's default length)
    init_seed: int = 0  # seeds the adapter's random init, so every worker and actor builds the same adapter

    def check(self) -> None:
        p = self
        # the list is untyped in the schema (omegaconf: Optional[list]), so its items are checked here
        _need(p.layers is None or (len(p.layers) > 0 and all(isinstance(i, int) and i >= 0 for i in p.layers)),
              "peft.layers", p.layers, "null (every block) or a non-empty list of block indices >= 0")
        _need(bool(p.target_modules) or p.method != "lora", "peft.target_modules", p.target_modules,
              "a non-empty list of module names for peft.method=lora")


_PROBABILITY = {"ge": 0, "le": 1, "hint": "a probability in [0, 1]"}
DLF_RULES = ("sum", "weighted", "prob")  # z_t + z_l | (1-w) z_t + w z_l | log((1-w) p_t + w p_l)
DLF_USES = ("pseudo_label", "train", "test")


@dataclass
class PafConfig:
    """ULFine's prototype adaptive fitting (SPEC B.3, Decision 5; the unconfirmed pieces are these options)."""

    # mu of alpha_k = mu * P_u^k / max_i P_u^i (value UNCONFIRMED in the paper)
    momentum: float = setting(0.01, ge=0, le=1)
    # P_u^k: pl_count = confident (hard) pseudo-labels of class k, mean_conf = teacher probability mass of class k;
    # summed over the round so far (offline: the round's table as streamed; online: every step's decisions).
    stat: str = setting("pl_count", choices=("pl_count", "mean_conf"))
    orth_weight: float = setting(0.1, ge=0)  # weight of ||P^ P^T - I||_F^2 over the L2-normalised text prototypes


@dataclass
class DlfConfig:
    """ULFine's dual logit fusion of the text-prototype logits and the linear-probe logits (SPEC B.4)."""

    rule: str = setting("sum", choices=DLF_RULES)
    weight: float = setting(0.5, ge=0, le=1)  # w of the weighted and prob rules
    # Where the fused logits are used; elsewhere the text-prototype logits are (train: each head gets its own loss).
    use_for: list = setting(["pseudo_label", "test"], items=DLF_USES, hint=f"a list of {', '.join(DLF_USES)} (may "
                            "be empty: the text-prototype logits everywhere)")


@dataclass
class AlgorithmConfig:
    # The method (METHODS above); its name also sets the defaults it implies, e.g.
    # fixmatch: c_hard = c_ood = 0.95, lambda_uc 0, tau 0; lp: peft.method none (YAML and overrides still win).
    name: str = setting("loft", choices=tuple(METHODS))
    # offline: the actor pool pseudo-labels the pool once per round; online: every step inside the train workers
    # (FixMatch-style: B labeled + mu * B unlabeled rows, weak view → teacher, strong view → student).
    mode: str = setting("offline", choices=("offline", "online"))
    c_hard: float = setting(0.6, **_PROBABILITY)  # MSP >= c_hard: hard pseudo-label
    # MSP <= c_ood: rejected (stage-2 OOD; LoFT-OW 0.3); in between: soft. c_ood = c_hard: no soft band
    c_ood: float = setting(0.0, **_PROBABILITY)
    lambda_u: float = setting(3.0, ge=0)
    lambda_uc: float = setting(1.0, ge=0)
    tau: float = setting(1.0, ge=0)  # logit adjustment strength of the supervised loss (0 = plain CE)
    temperature: float = setting(1.0, gt=0)  # T of the teacher softmax
    soft_weight: str = setting("one", choices=("one", "msp"))  # SPEC decision 1
    # Pool rows per labeled row in a step, offline and online (SPEC A.0.2: 7, what the paper configs set). 2 here: the
    # tiny run's random-weight teacher labels noise, and 7 noisy rows per labeled one drowned the labeled signal
    # (round-1 test accuracy at chance, BENCHMARKS.md "The step protocol on the tiny run").
    mu: int = setting(2, ge=1, hint="an integer >= 1 (pool rows per labeled row in a step)")
    zs_filter: bool = False  # stage-1 zero-shot filter of the pool (LoFT-OW)
    zs_threshold: float = setting(0.6, **_PROBABILITY)
    zs_keep: str = setting("above", choices=("above", "below"))
    paf: PafConfig = field(default_factory=PafConfig)
    dlf: DlfConfig = field(default_factory=DlfConfig)

    def check(self) -> None:
        a = self
        _need(a.c_ood <= a.c_hard, "algorithm.c_ood", a.c_ood, f"at most algorithm.c_hard ({a.c_hard}); with no soft "
              f"band (fixmatch, ulfine) set both, e.g. algorithm.c_hard={a.c_hard} algorithm.c_ood={a.c_hard}")
        _need(a.mode == "offline" or METHODS[a.name].pseudo_labels, "algorithm.mode", a.mode,
              f"offline for algorithm.name={a.name}, which trains on no pseudo-labels")


@dataclass
class ScoringConfig:
    batch_size: int = setting(256, ge=1, resumable=True)
    min_actors: int = setting(1, ge=1, resumable=True)
    max_actors: int = setting(1, resumable=True)
    # fractional on a 2-CPU Ray: leaves CPU for Ray Data's read/decode tasks
    cpus_per_actor: float = setting(0.5, gt=0, resumable=True)
    gpus_per_actor: float = setting(0.0, resumable=True)
    torch_threads: int = setting(1, resumable=True)
    # autocast of the forward on a GPU actor; not resumable: a table is scored at one precision
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    # Ray Data read + decode tasks feeding the actors: a decode task keeps one core busy, so it asks for one
    # (at 0.25, 4 decode processes per logical CPU starved the actor: 0.6x the rows/s on 2 cores). Not equal to
    # cpus_per_actor on CPU: Ray Data then fuses decoding into the actor process (ray#54433), where it cannot
    # overlap with scoring.
    cpus_per_data_task: float = setting(1.0, resumable=True)
    # Resume granularity in rows, whatever the shards' size: a killed job redoes at most one chunk of rows (a shard
    # or row group above it is split by row ranges); 0 = the whole input is one chunk.
    rows_per_chunk: int = setting(50_000, ge=0)
    custom_resources: dict = setting({})  # e.g. {scorer: 0.01}: pins actors to scorer nodes
    checkpoint: str = ""  # `loft-dist score`: the checkpoint dir that scores the pool ("" = zero-shot)
    input: str = ""  # `loft-dist score`: a dir of Parquet image shards, or an image folder
    output: str = ""  # `loft-dist score`: the table dir to write (resumable)
    # `loft-dist score` without a checkpoint: the zero-shot classes, as a list or a text file of one name per line
    # (unset: the class names of data.root's dataset.json)
    class_names: Any = None
    view: str = setting("clean", choices=("clean", "weak"))  # the teacher's view of the pool
    probs_topk: int = 0  # 0 = keep the full distribution; k > 0 keeps the renormalised top-k

    def check(self) -> None:
        s = self
        _need(s.max_actors >= s.min_actors, "scoring.max_actors", s.max_actors,
              f">= scoring.min_actors ({s.min_actors})")
        _need(s.precision == "fp32" or s.gpus_per_actor > 0, "scoring.precision", s.precision,
              "fp32 without a GPU (bf16/fp16 need scoring.gpus_per_actor > 0)")
        names = s.class_names
        _need(names is None or isinstance(names, str) or (isinstance(names, list) and len(names) >= 2
                                                          and all(isinstance(n, str) and n for n in names)),
              "scoring.class_names", names, "a list of at least 2 class names, or the path of a text file of one "
                                            "name per line")
        _need(not names or not s.checkpoint, "scoring.class_names", names,
              "only for zero-shot scoring: a checkpoint brings its own classes (drop scoring.checkpoint or this)")


@dataclass
class TrainConfig:
    num_workers: int = setting(2, ge=1)
    cpus_per_worker: float = setting(0.5, gt=0)
    use_gpu: bool = False
    micro_batch_size: int = setting(8, ge=1)  # x 2 workers = global batch 16 (SPEC B = 16)
    grad_accum: int = setting(1, ge=1)
    # 0: global batch = workers x micro x accum (scales with workers). > 0: the labeled rows of one optimizer step
    # whatever the worker count (SPEC B = 16): each rank takes global / workers of them, in micro batches of at most
    # micro_batch_size, and grad_accum is derived (train.batch_plan).
    global_batch_size: int = setting(0, ge=0)
    # 0: a round is epochs_per_round passes over the labeled rows. > 0: the optimizer steps of the whole run, across
    # rounds (SPEC A.0.2: 10,000), in "epochs" of steps_per_epoch steps (SPEC's eval_step 100): the cosine schedule
    # steps once per such epoch.
    max_steps: int = setting(0, ge=0)
    steps_per_epoch: int = setting(100, ge=1)
    epochs_per_round: int = 20
    lr: float = setting(0.02, gt=0)  # the tiny random-init model; the paper configs use SPEC's 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Global-norm clipping; 0 = off. 1.0 is what DeepSpeed applies when its config leaves clipping out, so it is
    # what every run did before this key reached DeepSpeed; the paper configs set 0 (their code does not clip).
    grad_clip: float = 1.0
    # DeepSpeed ZeRO stage 0-3. 0 by default: only adapter + head train, so ZeRO-1 shards almost nothing, yet its
    # per-step reduce + all-gather made 2 CPU workers' steps 8-20 % slower than stage 0's one all-reduce.
    zero_stage: int = setting(0, choices=(0, 1, 2, 3))
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    labeled_view: str = setting("weak", choices=("weak", "rrc", "clean"))  # SPEC: rrc (RandomResizedCrop + flip)
    # the student's view of accepted pool rows
    unlabeled_view: str = setting("strong", choices=("strong", "weak", "clean"))
    cpus_per_data_task: float = 0.5  # Ray Data decode/augment tasks feeding the workers
    shuffle_buffer: int = 256  # rows of local shuffle in each worker's stream (0 = off)
    # true: Ray Data hands every rank the same rows in the same order on every run (its split ignores locality),
    # so a run with clean views and no shuffle buffer is reproducible, weights included; false streams blocks as
    # they finish, which keeps the workers fed but lets rows change step (and rank) from run to run.
    preserve_order: bool = False
    # batches each worker's iterator formats ahead, in a thread beside the step
    prefetch_batches: int = setting(1, ge=0)
    placement_strategy: str = setting("PACK", choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"))
    custom_resources: dict = setting({})  # e.g. {trainer: 0.01}: pins workers to trainer nodes
    max_failures: int = setting(1, resumable=True)
    # Epochs between reported checkpoints (the round's last epoch always reports one): a failure redoes at most this
    # many. A checkpoint is a DeepSpeed save and a barrier of every rank, ~1.1 s on 2 cores: at 1, the demo's
    # 20 one-second epochs spent more time checkpointing than training.
    checkpoint_every: int = setting(5, ge=1, resumable=True)
    num_to_keep: int = 2

    def batch_plan(self) -> tuple[int, int]:
        """(micro batch per rank, accumulation steps) of one optimizer step."""
        if not self.global_batch_size:
            return self.micro_batch_size, self.grad_accum
        per_rank = self.global_batch_size // self.num_workers
        micro = min(self.micro_batch_size, per_rank)
        return micro, per_rank // micro

    def epochs_per_round_for(self, num_rounds: int) -> int:
        """Epochs of one round: epochs_per_round, or train.max_steps split evenly over the rounds."""
        return self.max_steps // (max(num_rounds, 1) * self.steps_per_epoch) if self.max_steps else self.epochs_per_round

    def check(self) -> None:
        t = self
        per_rank = t.global_batch_size // t.num_workers
        _need(t.global_batch_size == 0 or t.global_batch_size % t.num_workers == 0, "train.global_batch_size",
              t.global_batch_size, f"0 or a multiple of train.num_workers ({t.num_workers})")
        _need(t.global_batch_size == 0 or per_rank % min(t.micro_batch_size, per_rank) == 0,
              "train.micro_batch_size", t.micro_batch_size,
              f"a divisor of the {per_rank} rows each of {t.num_workers} workers takes of train.global_batch_size="
              f"{t.global_batch_size}")
        _need(t.precision == "fp32" or t.use_gpu, "train.precision", t.precision,
              "fp32 without a GPU (bf16/fp16 need train.use_gpu=true)")


@dataclass
class RoundsConfig:
    num_rounds: int = setting(2, ge=0)


@dataclass
class EvalConfig:
    many_threshold: int = 100  # "many" = labeled count > this (SPEC F)
    few_threshold: int = 20  # "few" = labeled count < this
    ece_bins: int = 15

    def check(self) -> None:
        _need(self.few_threshold <= self.many_threshold, "eval.few_threshold", self.few_threshold,
              f"at most eval.many_threshold ({self.many_threshold})")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> str:
        from loft_dist.storage import join

        return join(self.run.storage_path, self.run.name)  # a URI stays a URI

    @property
    def data_root(self) -> str:
        from loft_dist.storage import join

        return self.data.root or join(self.run_dir, "data")

    def check(self) -> None:
        """The rules across fields, section by section, then the one across sections: the method's peft.method."""
        for section in (self.data, self.peft, self.algorithm, self.scoring, self.train, self.eval):
            section.check()
        a, p = self.algorithm, self.peft
        method = METHODS[a.name]
        _need(not method.peft_methods or p.method in method.peft_methods, "peft.method", p.method,
              f"algorithm.name={a.name} ({method.summary}) is defined with peft.method "
              f"{' | '.join(method.peft_methods)}")
        _need(not (self.train.zero_stage == 3 and p.method == "lora"), "train.zero_stage", 3,
              "not with peft.method=lora: DeepSpeed ZeRO-3 does not partition peft's LoRA on nn.MultiheadAttention "
              "(it fails at start-up: 'Parameter' object has no attribute 'ds_numel'); use peft.method=adaptformer "
              "(the papers' adapter) or a ZeRO stage of 0-2")
        t, rounds = self.train, max(self.rounds.num_rounds, 1)
        _need(t.max_steps % (rounds * t.steps_per_epoch) == 0, "train.max_steps", t.max_steps,
              f"0 or a multiple of rounds.num_rounds x train.steps_per_epoch ({rounds} x {t.steps_per_epoch}): every "
              f"round trains the same whole epochs")


# --------------------------------------------------------------------------------------------
# the generic checks, over every field of every section (nested ones included)
# --------------------------------------------------------------------------------------------
def _section_type(f: dataclasses.Field) -> Optional[type]:
    """The dataclass of a section field, else None (annotations are strings: `from __future__ import annotations`)."""
    t = globals().get(f.type) if isinstance(f.type, str) else f.type
    return t if dataclasses.is_dataclass(t) else None


def _leaves(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every value of the schema, nested sections walked."""
    for f in dataclasses.fields(schema):
        sub = _section_type(f)
        if sub:
            yield from _leaves(sub, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def resumable_keys() -> tuple[str, ...]:
    """The keys that may change between a run and its resume: where it runs, not what it computes."""
    return tuple(key for key, f in _leaves(Config) if f.metadata.get("resumable"))


def _problem(value: Any, f: dataclasses.Field) -> str:
    """What the field's own constraints say of its value, as the end of the error message; "" when it is allowed."""
    meta = f.metadata
    if value is None:  # omegaconf has already refused None where the field is not Optional
        return ""
    if "choices" in meta and value not in meta["choices"]:
        return f": {meta['hint']}" if "hint" in meta else f"; choose one of: {', '.join(map(str, meta['choices']))}"
    if "items" in meta and any(v not in meta["items"] for v in value):
        return f": {meta.get('hint') or 'a list of ' + ', '.join(map(str, meta['items']))}"
    bounds = [(name, meta[name]) for name in _BOUNDS if name in meta]
    if all(_BOUNDS[name][0](value, b) for name, b in bounds):
        return ""
    if "hint" in meta:
        return f": {meta['hint']}"
    if [name[0] for name, _ in bounds] == ["g", "l"]:  # a lower and an upper end (_BOUNDS lists lower ends first)
        (lo, a), (hi, b) = bounds
        return f": in {'[' if lo == 'ge' else '('}{a}, {b}{']' if hi == 'le' else ')'}"
    integer = "an integer " if f.type in ("int", "Optional[int]") else ""
    return ": " + integer + " and ".join(f"{_BOUNDS[name][1]} {b}" for name, b in bounds)


def _check_fields(cfg: Config) -> None:
    for key, f in _leaves(Config):
        value = reduce(getattr, key.split("."), cfg)
        problem = _problem(value, f)
        if problem:
            raise ConfigError(f"{key}={value!r} is not allowed{problem}")


def _check_keys(given: Any, schema: type, prefix: str = "") -> None:
    """Reject unknown keys with the list of valid ones (omegaconf's own message does not list them)."""
    if not isinstance(given, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in given.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(sorted(fields))}")
        sub_cls = _section_type(fields[key])
        if sub_cls:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' is a section ({', '.join(f.name for f in dataclasses.fields(sub_cls))}); "
                                  f"got the value {value!r}")
            _check_keys(value, sub_cls, where + ".")


# Keys that an older loft_dist wrote into a run dir's config.yaml and that nothing reads any more: dropped on load,
# so that resuming, exporting or scoring with that file keeps working.
RETIRED_KEYS = ("eval.batch_size", "scoring.shards_per_chunk")  # the latter: scoring.rows_per_chunk since issue 22


def _drop_retired(layer: dict) -> dict:
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        if isinstance(layer.get(section), dict) and name in layer[section]:
            log.warning("config key %s is no longer used; ignored", key)
            layer = {**layer, section: {k: v for k, v in layer[section].items() if k != name}}
    return layer


def _method_defaults(layers: list[dict]) -> dict:
    """The config values implied by the algorithm.name the layers end up with (they go beneath every layer)."""
    name = AlgorithmConfig().name
    for layer in layers:
        section = layer.get("algorithm")
        if isinstance(section, dict) and "name" in section:
            name = section["name"]
    return METHODS[name].defaults if name in METHODS else {}  # an unknown name is reported by _check_fields


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file (optional) + dotlist overrides → a validated Config. Raises ConfigError."""
    layers = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
        try:
            layers.append(OmegaConf.to_container(OmegaConf.load(p)) or {})
        except OmegaConfBaseException as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.num_workers=4)")
        try:
            layers.append(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} could not be parsed: {e}") from e
    layers = [_drop_retired(layer) if isinstance(layer, dict) else layer for layer in layers]
    for layer in layers:
        _check_keys(layer, Config)
    merged = OmegaConf.merge(OmegaConf.structured(Config), _method_defaults(layers))
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            value = getattr(e, "value", None)
            raise ConfigError(f"config key '{key}' got {value!r}: {str(e).splitlines()[0]}") from e
    cfg: Config = OmegaConf.to_object(merged)
    _check_fields(cfg)
    cfg.check()
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config inside Ray workers and actors (plain dicts cross the Ray boundary), or from a config.yaml."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _drop_retired(d)))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
