"""The structured config of every loft_dist command: dataclasses + omegaconf, validated before Ray starts.

The dataclass defaults are the embedded tiny run (offline, minutes on 2 CPU cores); the paper
settings in `configs/*.yaml` override them. Every command takes a YAML file plus `key=value`
overrides (omegaconf dotlist).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loft_dist.errors import ConfigError  # noqa: F401 - re-exported: most modules import it from here


def _choices(default: str, *allowed: str):
    return field(default=default, metadata={"choices": (default, *allowed)})


@dataclass
class RunConfig:
    name: str = "tiny"
    storage_path: str = "runs"  # run dir = <storage_path>/<name>; shared by every node on a cluster
    seed: int = 0
    ray_address: Optional[str] = None  # None: RAY_ADDRESS if set (ray job submit, KubeRay), else a local Ray
    num_cpus: Optional[int] = None  # logical CPUs of a local Ray (None: the machine's count)
    object_store_mb: int = 1024  # cap of a local Ray's object store


@dataclass
class DataConfig:
    # The dataset dir (labeled/ unlabeled/ test/ [ood_test/] + dataset.json): a path or a pyarrow URI
    # (file://, s3://, gs://, …); "" = <run dir>/data.
    root: str = ""
    source: str = _choices("embedded", "cifar10", "cifar100", "imagefolder", "manifest")
    source_path: str = ""  # where the source lives (CIFAR dir, ImageFolder root, manifest .csv/.parquet)
    image_size: int = 32  # the model's input size; images are resized to it
    # Labeled/unlabeled protocol. lt (SPEC D.1): n_c = floor(N1 * gamma_l^(-c/(C-1))), pool m_c likewise from
    # M1, gamma_u in the order of unlabeled_dist. percent (SPEC D.2): labeled_percent % of each class is
    # labeled (round half up, at least 1), the rest of the class is the pool.
    protocol: str = _choices("lt", "percent")
    n1: int = 40
    gamma_l: float = 10.0
    m1: int = 80
    gamma_u: float = 10.0
    unlabeled_dist: str = _choices("consistent", "uniform", "reversed")
    labeled_percent: float = 1.0  # a percentage: 1.0 = 1 % (LoFT's code writes the same as the fraction 0.01)
    labeled_in_unlabeled: bool = False  # the DARP/ACR/LoFT code convention puts labeled images in the pool too
    # Test split: official = the source's own test set (CIFAR's test batch; data.test_path for an ImageFolder
    # tree or a manifest); carve = test_per_class images of each class taken from the training source;
    # auto = official where the source has one, else carve.
    test_source: str = _choices("auto", "official", "carve")
    test_path: str = ""  # ImageFolder root or manifest of the official test set
    test_per_class: int = 40  # carve only
    # Open world: OOD images (true_label -1) mixed into the pool and, optionally, an ood_test split.
    ood_source: str = _choices("generated", "cifar10", "cifar100", "imagefolder", "manifest")
    ood_path: str = ""  # CIFAR dir, any directory of images (searched recursively, e.g. COCO train2017/), or manifest
    ood_count: Optional[int] = None  # OOD images in the pool; None = ood_ratio decides; -1 = all the source holds
    ood_ratio: float = 0.25  # OOD images in the pool as a share of the ID pool size (when ood_count is None)
    ood_test: int = 200  # OOD images in the ood_test split (0 = no split); never the same images as the pool's
    ood_image_size: int = 0  # side of generated OOD images; 0 = data.image_size (CIFAR configs: 32, like the ID images)
    shard_mb: float = 128.0  # target shard size
    rows_per_shard: int = 256  # cap on rows per shard: more shards = more parallel read tasks
    hflip: bool = False  # horizontal flips in the train views (off for digits; the paper configs turn it on)


@dataclass
class ModelConfig:
    name: str = "loft-tiny-vit"  # any open_clip model name, or one of loft_dist/models/model_configs
    pretrained: str = ""  # "" = random init; an open_clip tag (from the local cache) or a .pt/.bin/.safetensors file
    head_scale: float = 25.0  # s of the cosine classifier
    prompt: str = "a photo of a {}."
    force_quick_gelu: bool = False  # OpenAI weights loaded from a file need QuickGELU
    init_seed: int = 0  # seeds random init, so every process builds the same backbone


@dataclass
class PeftConfig:
    # What trains in the image tower (loft_dist/models/adapters.py); the paper's LoFT uses adaptformer.
    method: str = _choices("lora", "adaptformer", "vpt", "bitfit", "ln", "full", "none")
    # LoRA rank / AdaptFormer bottleneck; 0 = the released code's rule r = 2**max(0, int(log2(C / (2 * n_layers)))).
    r: int = 8
    layers: Optional[list] = None  # block indices that get the adapter (lora, adaptformer, vpt, bitfit, ln); None = all
    alpha: int = 16  # LoRA scaling alpha / r
    dropout: float = 0.0  # LoRA dropout
    # nn.MultiheadAttention ("attn": LoRA on the packed in_proj) and the MLP; out_proj alone gets no gradient.
    target_modules: list = field(default_factory=lambda: ["attn", "mlp.c_fc", "mlp.c_proj"])
    vpt_tokens: int = 10  # VPT-deep prompts per block (LIFT's default length)
    init_seed: int = 0  # seeds the adapter's random init, so every worker and actor builds the same adapter


@dataclass
class PafConfig:
    """ULFine's prototype adaptive fitting (SPEC B.3, Decision 5; the unconfirmed pieces are these options)."""

    momentum: float = 0.01  # mu of alpha_k = mu * P_u^k / max_i P_u^i (value UNCONFIRMED in the paper)
    # P_u^k: pl_count = confident (hard) pseudo-labels of class k, mean_conf = teacher probability mass of class k;
    # summed over the round so far (offline: the round's table as streamed; online: every step's decisions).
    stat: str = _choices("pl_count", "mean_conf")
    orth_weight: float = 0.1  # weight of ||P^ P^T - I||_F^2 over the L2-normalised text prototypes


@dataclass
class DlfConfig:
    """ULFine's dual logit fusion of the text-prototype logits and the linear-probe logits (SPEC B.4)."""

    rule: str = _choices("sum", "weighted", "prob")  # z_t + z_l | (1-w) z_t + w z_l | log((1-w) p_t + w p_l)
    weight: float = 0.5  # w of the weighted and prob rules
    # Where the fused logits are used; elsewhere the text-prototype logits are (train: each head gets its own loss).
    use_for: list = field(default_factory=lambda: ["pseudo_label", "test"])


@dataclass
class AlgorithmConfig:
    # The method (loft_dist/algorithms/__init__.py METHODS); its name also sets the defaults it implies, e.g.
    # fixmatch: c_hard = c_ood = 0.95, lambda_uc 0, tau 0; lp: peft.method none (YAML and overrides still win).
    name: str = _choices("loft", "loft_ow", "ulfine", "fixmatch", "lp", "lft", "fft", "zero_shot")
    # offline: the actor pool pseudo-labels the pool once per round; online: every step inside the train workers
    # (FixMatch-style: B labeled + mu * B unlabeled rows, weak view → teacher, strong view → student).
    mode: str = _choices("offline", "online")
    c_hard: float = 0.6  # MSP >= c_hard: hard pseudo-label
    c_ood: float = 0.0  # MSP <= c_ood: rejected (stage-2 OOD; LoFT-OW 0.3); in between: soft. c_ood = c_hard: no soft band
    lambda_u: float = 3.0
    lambda_uc: float = 1.0
    tau: float = 1.0  # logit adjustment strength of the supervised loss (0 = plain CE)
    temperature: float = 1.0  # T of the teacher softmax
    soft_weight: str = _choices("one", "msp")  # SPEC decision 1
    mu: int = 7  # online: unlabeled rows per labeled row in a step
    zs_filter: bool = False  # stage-1 zero-shot filter of the pool (LoFT-OW)
    zs_threshold: float = 0.6
    zs_keep: str = _choices("above", "below")
    paf: PafConfig = field(default_factory=PafConfig)
    dlf: DlfConfig = field(default_factory=DlfConfig)


@dataclass
class ScoringConfig:
    batch_size: int = 256
    min_actors: int = 1
    max_actors: int = 1
    cpus_per_actor: float = 0.5  # fractional on a 2-CPU Ray: leaves CPU for Ray Data's read/decode tasks
    gpus_per_actor: float = 0.0
    torch_threads: int = 1
    # Ray Data read + decode tasks feeding the actors: a decode task keeps one core busy, so it asks for one
    # (at 0.25, 4 decode processes per logical CPU starved the actor: 0.6x the rows/s on 2 cores). Not equal to
    # cpus_per_actor on CPU: Ray Data then fuses decoding into the actor process (ray#54433), where it cannot
    # overlap with scoring.
    cpus_per_data_task: float = 1.0
    shards_per_chunk: int = 64  # resume granularity: a killed job redoes at most one chunk (0 = one chunk)
    custom_resources: dict = field(default_factory=dict)  # e.g. {scorer: 0.01}: pins actors to scorer nodes
    checkpoint: str = ""  # `loft-dist score`: the checkpoint dir that scores the pool ("" = zero-shot)
    input: str = ""  # `loft-dist score`: a dir of Parquet image shards, or an image folder
    output: str = ""  # `loft-dist score`: the table dir to write (resumable)
    view: str = _choices("clean", "weak")  # the teacher's view of the pool
    probs_topk: int = 0  # 0 = keep the full distribution; k > 0 keeps the renormalised top-k


@dataclass
class TrainConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    micro_batch_size: int = 8  # x 2 workers = global batch 16 (SPEC B = 16)
    grad_accum: int = 1
    # 0: global batch = workers x micro x accum (scales with workers); > 0: kept fixed, grad_accum is derived.
    global_batch_size: int = 0
    epochs_per_round: int = 20
    lr: float = 0.02  # the tiny random-init model; the paper configs use SPEC's 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Global-norm clipping; 0 = off. 1.0 is what DeepSpeed applies when its config leaves clipping out, so it is
    # what every run did before this key reached DeepSpeed; the paper configs set 0 (their code does not clip).
    grad_clip: float = 1.0
    # DeepSpeed ZeRO stage 0-3. 0 by default: only adapter + head train, so ZeRO-1 shards almost nothing, yet its
    # per-step reduce + all-gather made 2 CPU workers' steps 8-20 % slower than stage 0's one all-reduce.
    zero_stage: int = 0
    precision: str = _choices("fp32", "bf16", "fp16")
    labeled_view: str = _choices("weak", "rrc", "clean")  # SPEC: rrc (RandomResizedCrop + flip)
    unlabeled_view: str = _choices("strong", "weak", "clean")  # the student's view of accepted pool rows
    cpus_per_data_task: float = 0.5  # Ray Data decode/augment tasks feeding the workers
    shuffle_buffer: int = 256  # rows of local shuffle in each worker's stream (0 = off)
    # true: Ray Data hands every rank the same rows in the same order on every run (its split ignores locality),
    # so a run with clean views and no shuffle buffer is reproducible, weights included; false streams blocks as
    # they finish, which keeps the workers fed but lets rows change step (and rank) from run to run.
    preserve_order: bool = False
    prefetch_batches: int = 1  # batches each worker's iterator formats ahead, in a thread beside the step
    placement_strategy: str = _choices("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
    custom_resources: dict = field(default_factory=dict)  # e.g. {trainer: 0.01}: pins workers to trainer nodes
    max_failures: int = 1
    num_to_keep: int = 2


@dataclass
class RoundsConfig:
    num_rounds: int = 2


@dataclass
class EvalConfig:
    batch_size: int = 256
    many_threshold: int = 100  # "many" = labeled count > this (SPEC F)
    few_threshold: int = 20  # "few" = labeled count < this
    ece_bins: int = 15


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
        return str(Path(self.run.storage_path) / self.run.name)

    @property
    def data_root(self) -> str:
        return self.data.root or str(Path(self.run_dir) / "data")


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
        sub = fields[key].type
        sub_cls = globals().get(sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub_cls):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' is a section ({', '.join(f.name for f in dataclasses.fields(sub_cls))}); "
                                  f"got the value {value!r}")
            _check_keys(value, sub_cls, where + ".")


def _check_values(cfg: Config) -> None:
    for section in dataclasses.fields(Config):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            allowed = f.metadata.get("choices")
            if allowed and getattr(obj, f.name) not in allowed:
                raise ConfigError(f"{section.name}.{f.name}={getattr(obj, f.name)!r} is not allowed; "
                                  f"choose one of: {', '.join(map(str, allowed))}")

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")

    a, t, s, d = cfg.algorithm, cfg.train, cfg.scoring, cfg.data
    p = cfg.peft
    need(p.r >= 0, "peft.r", p.r, "an integer >= 0 (0 = automatic bottleneck from the number of classes)")
    need(p.vpt_tokens >= 1, "peft.vpt_tokens", p.vpt_tokens, "an integer >= 1")
    need(0.0 <= p.dropout < 1.0, "peft.dropout", p.dropout, "a probability in [0, 1)")
    need(p.layers is None or (len(p.layers) > 0 and all(isinstance(i, int) and i >= 0 for i in p.layers)),
         "peft.layers", p.layers, "null (every block) or a non-empty list of block indices >= 0")
    need(bool(p.target_modules) or p.method != "lora", "peft.target_modules", p.target_modules,
         "a non-empty list of module names for peft.method=lora")
    _check_algorithm(cfg, need)
    need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "one of 0, 1, 2, 3")
    need(t.num_workers >= 1, "train.num_workers", t.num_workers, "an integer >= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "an integer >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1")
    need(t.global_batch_size == 0 or t.global_batch_size % (t.num_workers * t.micro_batch_size) == 0,
         "train.global_batch_size", t.global_batch_size,
         f"0 or a multiple of train.num_workers x train.micro_batch_size ({t.num_workers} x {t.micro_batch_size})")
    need(t.cpus_per_worker > 0, "train.cpus_per_worker", t.cpus_per_worker, "> 0")
    need(t.prefetch_batches >= 0, "train.prefetch_batches", t.prefetch_batches, "an integer >= 0")
    need(t.lr > 0, "train.lr", t.lr, "> 0")
    need(t.precision == "fp32" or t.use_gpu, "train.precision", t.precision,
         "fp32 without a GPU (bf16/fp16 need train.use_gpu=true)")
    need(s.min_actors >= 1, "scoring.min_actors", s.min_actors, "an integer >= 1")
    need(s.max_actors >= s.min_actors, "scoring.max_actors", s.max_actors, f">= scoring.min_actors ({s.min_actors})")
    need(s.cpus_per_actor > 0, "scoring.cpus_per_actor", s.cpus_per_actor, "> 0")
    need(s.batch_size >= 1, "scoring.batch_size", s.batch_size, "an integer >= 1")
    # data.*
    need(d.source == "embedded" or bool(d.source_path), "data.source_path", d.source_path,
         f"data.source={d.source} reads from a path; set data.source_path to the "
         + {"cifar10": "directory holding cifar-10-batches-py", "cifar100": "directory holding cifar-100-python",
            "imagefolder": "ImageFolder root (<root>/<class>/<image>)"}.get(d.source, ".csv or .parquet manifest"))
    need(d.n1 >= 1, "data.n1", d.n1, "an integer >= 1")
    need(d.m1 >= 0, "data.m1", d.m1, "an integer >= 0")
    need(d.gamma_l >= 1, "data.gamma_l", d.gamma_l, ">= 1 (the imbalance ratio n_1 / n_C)")
    need(d.gamma_u >= 1, "data.gamma_u", d.gamma_u, ">= 1 (use data.unlabeled_dist=reversed for a reversed pool)")
    need(0 < d.labeled_percent <= 100, "data.labeled_percent", d.labeled_percent,
         "a percentage in (0, 100]; 1.0 means 1 % of each class")
    has_official_test = d.source in ("cifar10", "cifar100") or bool(d.test_path)
    need(d.test_source != "official" or has_official_test, "data.test_source", d.test_source,
         "the embedded digits have no official test set; use carve" if d.source == "embedded" else
         f"data.source={d.source} needs data.test_path (ImageFolder root or manifest of the test set); or use carve")
    need(not d.test_path or d.source in ("imagefolder", "manifest"), "data.test_path", d.test_path,
         "only read for data.source=imagefolder|manifest (CIFAR's official test batch is found by itself)")
    need(not d.test_path or d.test_source != "carve", "data.test_path", d.test_path,
         "not read with data.test_source=carve; drop it or use data.test_source=official")
    carves = d.test_source == "carve" or (d.test_source == "auto" and not has_official_test)
    need(d.test_per_class >= 1 or not carves, "data.test_per_class", d.test_per_class,
         "an integer >= 1 when the test split is carved from the source")
    need(d.ood_source == "generated" or bool(d.ood_path), "data.ood_path", d.ood_path,
         f"data.ood_source={d.ood_source} reads from a path; set data.ood_path")
    need(not (d.ood_source == d.source and d.ood_path == d.source_path), "data.ood_path", d.ood_path,
         "the OOD images must come from another source than the ID images (data.source_path)")
    need(d.ood_count is None or d.ood_count >= -1, "data.ood_count", d.ood_count,
         "null (use data.ood_ratio), -1 (every image of the OOD source) or a count >= 0")
    need(d.ood_count != -1 or d.ood_source != "generated", "data.ood_count", d.ood_count,
         "-1 (every image of the OOD source) needs a finite source; data.ood_source=generated makes any count")
    need(d.ood_ratio >= 0, "data.ood_ratio", d.ood_ratio, ">= 0")
    need(d.ood_test >= 0, "data.ood_test", d.ood_test, "an integer >= 0 (0 = no ood_test split)")
    need(d.ood_image_size == 0 or d.ood_image_size >= 8, "data.ood_image_size", d.ood_image_size,
         "0 (= data.image_size) or >= 8 pixels")
    need(d.image_size >= 8, "data.image_size", d.image_size, ">= 8 pixels")
    need(d.shard_mb > 0, "data.shard_mb", d.shard_mb, "> 0 (megabytes per shard)")
    need(d.rows_per_shard >= 1, "data.rows_per_shard", d.rows_per_shard, "an integer >= 1")
    need(cfg.rounds.num_rounds >= 0, "rounds.num_rounds", cfg.rounds.num_rounds, "an integer >= 0")
    need(cfg.eval.few_threshold <= cfg.eval.many_threshold, "eval.few_threshold", cfg.eval.few_threshold,
         f"at most eval.many_threshold ({cfg.eval.many_threshold})")


def _check_algorithm(cfg: Config, need) -> None:
    from loft_dist.algorithms import METHODS

    a, p = cfg.algorithm, cfg.peft
    for key in ("c_hard", "c_ood", "zs_threshold"):
        v = getattr(a, key)
        need(0.0 <= v <= 1.0, f"algorithm.{key}", v, "a probability in [0, 1]")
    need(a.c_ood <= a.c_hard, "algorithm.c_ood", a.c_ood, f"at most algorithm.c_hard ({a.c_hard}); with no soft "
         f"band (fixmatch, ulfine) set both, e.g. algorithm.c_hard={a.c_hard} algorithm.c_ood={a.c_hard}")
    need(a.temperature > 0, "algorithm.temperature", a.temperature, "> 0")
    for key in ("lambda_u", "lambda_uc", "tau"):
        need(getattr(a, key) >= 0, f"algorithm.{key}", getattr(a, key), ">= 0")
    need(a.mu >= 1, "algorithm.mu", a.mu, "an integer >= 1 (unlabeled rows per labeled row in an online step)")
    method = METHODS[a.name]
    need(not method.peft_methods or p.method in method.peft_methods, "peft.method", p.method,
         f"algorithm.name={a.name} ({method.summary}) is defined with peft.method "
         f"{' | '.join(method.peft_methods)}")
    need(a.mode == "offline" or method.pseudo_labels, "algorithm.mode", a.mode,
         f"offline for algorithm.name={a.name}, which trains on no pseudo-labels")
    need(a.paf.stat in ("pl_count", "mean_conf"), "algorithm.paf.stat", a.paf.stat, "pl_count | mean_conf")
    need(0.0 <= a.paf.momentum <= 1.0, "algorithm.paf.momentum", a.paf.momentum, "in [0, 1]")
    need(a.paf.orth_weight >= 0, "algorithm.paf.orth_weight", a.paf.orth_weight, ">= 0")
    need(a.dlf.rule in ("sum", "weighted", "prob"), "algorithm.dlf.rule", a.dlf.rule, "sum | weighted | prob")
    need(0.0 <= a.dlf.weight <= 1.0, "algorithm.dlf.weight", a.dlf.weight, "in [0, 1]")
    uses = ("pseudo_label", "train", "test")
    need(all(u in uses for u in a.dlf.use_for), "algorithm.dlf.use_for", a.dlf.use_for,
         f"a list of {', '.join(uses)} (may be empty: the text-prototype logits everywhere)")


def _method_defaults(layers: list[dict]) -> dict:
    """The config values implied by the algorithm.name the layers end up with (they go beneath every layer)."""
    from loft_dist.algorithms import METHODS

    name = AlgorithmConfig().name
    for layer in layers:
        section = layer.get("algorithm")
        if isinstance(section, dict) and "name" in section:
            name = section["name"]
    return METHODS[name].defaults if name in METHODS else {}  # an unknown name is reported by _check_values


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
    _check_values(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config inside Ray workers and actors (plain dicts cross the Ray boundary)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
