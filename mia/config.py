"""The run configuration shared by the notebook and the CLI."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum


class Access(StrEnum):
    """What an attacker of a task sees of the model's answers (values as written in result.json)."""

    POSTERIOR = "posterior"  # logits / probabilities of every query
    LABEL = "label"  # predicted labels only


ACCESS_LEVELS = tuple(a.value for a in Access)


@dataclass(frozen=True)
class TaskConfig:
    """One challenge task and what the attacker may see."""

    task: int  # K in results/task{K}_<arch>_<dataset>.npy
    access: Access  # Access.POSTERIOR or Access.LABEL (the strings "posterior" / "label" are accepted)

    def __post_init__(self):
        if self.access not in ACCESS_LEVELS:
            raise ValueError(f"task {self.task}: access must be one of {ACCESS_LEVELS}, got {self.access!r}")
        object.__setattr__(self, "access", Access(self.access))
        if not isinstance(self.task, int) or self.task < 1:
            raise ValueError(f"task number must be a positive int, got {self.task!r}")


#: The challenge's three tasks: 1 and 2 see posteriors, 3 sees predicted labels only.
CHALLENGE_TASKS = (TaskConfig(1, Access.POSTERIOR), TaskConfig(2, Access.POSTERIOR), TaskConfig(3, Access.LABEL))


@dataclass
class RunConfig:
    """Everything that decides a run's outputs. Written into result.json."""

    tasks: tuple[TaskConfig, ...] = CHALLENGE_TASKS  # which tasks to produce and their access levels
    method: str = "strong"  # "strong": all candidates, chosen by CV; "seed": the seed's method only
    views: str = "standard"  # query views: "identity", "flip" or "standard" (identity, flip, 8 shifts)
    folds: int = 5  # k of the stratified k-fold cross-validation on eval
    cv_repeats: int = 5  # independent k-fold splits averaged (the same for every candidate): one 5-fold split of
    #   2,000 records moves a CV accuracy by about a point from seed to seed; 5 x 5 folds keep it steadier
    class_shrinkage: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0, float("inf"))  # per-class thresholds: strengths
    #   tried (by an inner CV inside every fit) of the pull towards the global threshold, in pseudo-records of
    #   the global rule per class, in units of the mean class size n/C: 0 = free, 1 = half weight for a mean
    #   class, inf = the global threshold
    score_ranking: bool = True  # the scores written follow the candidate with the best CV AUC (its order, made to
    #   give the chosen predictions at one threshold: mia.core.thresholds.consistent_ranking); False: the chosen
    #   candidate's own scores
    bootstrap_resamples: int = 1000  # percentile bootstrap of the test metrics (with an answer key); 0 = none
    seed: int = 0  # fold assignment and learned models
    min_class_count: int = 20  # fewer eval records of a class -> the global threshold is used for it
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    batch_size: int = 256  # records per forward pass (each expands to one image per view)
    precision: str = "auto"  # scoring arithmetic: "auto" = "fp32" (on CUDA without TF32: the same choices as a
    #   CPU run), or "bf16" (bf16 autocast, fp32 classifier head: faster on a GPU, emulated on the CPU); the
    #   reference models' logits follow it; see mia.scoring.resolve_precision
    compile: bool = False  # score through torch.compile (mia.scoring.compute_logits): pays off on a GPU for a
    #   whole challenge bundle; the logits are cached apart from uncompiled ones
    plots: bool = True  # write results/plots/*.png
    cache: bool = True  # cache logits, validated records and figures, keyed by contents (never inside the bundle)
    cache_dir: str | None = None  # the cache's folder; None: $MIA_CACHE_DIR, else the user's cache folder
    #   (platformdirs.user_cache_dir("mia"), see mia.io.cache.cache_root). Not written into result.json
    trust_checkpoints: bool = False  # allow checkpoints that are whole pickled models (runs their code)
    keep_going: bool = False  # on a failing victim, finish the others and report the failure
    references: bool = True  # use reference models under <bundle>/references/ when present (LiRA, RMIA)
    reference_budget: float = 600.0  # seconds of reference-model training a run on CUDA may spend on a victim that
    #   has none (as many models as fit: 1, or an even number); 0 = never. On a CPU the run only says what one
    #   would cost
    population: str | None = None  # records of the victims' distribution outside their eval and test files (a
    #   .p file or a folder of them, records [image, label]): on CUDA a victim without reference models first
    #   gets one distilled from its predicted labels on them (mia.references.auto), then standard ones with
    #   what is left of reference_budget; on a CPU the run names the command that trains it
    reference_models: int | None = None  # use at most this many of a victim's complete reference models (the
    #   first ones, its distilled ones first); None = all. Measures an attack at a smaller budget without retraining
    reference_views: str = "flip"  # views the references are queried on (those of `views` in this set): each
    #   reference model costs one victim scoring per view, so CPU runs keep image + flip (as LiRA does)
    label_noise: tuple[float, ...] = (0.1, 0.15)  # label-only noisy queries: noise levels in units of the eval
    #   images' pixel standard deviation; () turns them off
    label_noise_draws: int = 8  # noisy copies of the image, and as many of its flip, per noise level
    victims: tuple[str, ...] | None = None  # only these victims (<arch>_<dataset>); None = all
    extra: dict = field(default_factory=dict)  # free-form notes carried into result.json

    def __post_init__(self):
        self.tasks = tuple(t if isinstance(t, TaskConfig) else TaskConfig(**t) for t in self.tasks)
        if self.method not in ("strong", "seed"):
            raise ValueError(f"method must be 'strong' or 'seed', got {self.method!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not self.reference_budget >= 0:
            raise ValueError(f"reference_budget must be >= 0 seconds, got {self.reference_budget}")
        if self.reference_models is not None and (isinstance(self.reference_models, bool)
                                                  or not isinstance(self.reference_models, int)
                                                  or self.reference_models < 1):
            raise ValueError(f"reference_models must be a positive int or None, got {self.reference_models!r}")
        if self.population is not None:
            self.population = str(self.population)
        if self.reference_views not in ("identity", "flip", "standard"):
            raise ValueError(f"reference_views must be 'identity', 'flip' or 'standard', got {self.reference_views!r}")
        self.label_noise = tuple(float(s) for s in self.label_noise)
        if any(not s > 0 for s in self.label_noise):
            raise ValueError(f"label_noise levels must be positive, got {self.label_noise}")
        if self.label_noise_draws < 1:
            raise ValueError(f"label_noise_draws must be at least 1, got {self.label_noise_draws}")
        self.class_shrinkage = tuple(float(x) for x in self.class_shrinkage)
        if not self.class_shrinkage or any(not x >= 0 for x in self.class_shrinkage):
            raise ValueError(f"class_shrinkage must be one or more values >= 0, got {self.class_shrinkage}")
        if self.cv_repeats < 1:
            raise ValueError(f"cv_repeats must be at least 1, got {self.cv_repeats}")
        if self.bootstrap_resamples < 0:
            raise ValueError(f"bootstrap_resamples must be >= 0, got {self.bootstrap_resamples}")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if len({t.task for t in self.tasks}) != len(self.tasks):
            raise ValueError("task numbers must be unique")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = [asdict(t) for t in self.tasks]
        d["victims"] = list(self.victims) if self.victims is not None else None
        d["label_noise"] = list(self.label_noise)
        del d["cache_dir"]  # where this machine keeps its cache changes no output (and names a home folder)
        d["class_shrinkage"] = [x if x < float("inf") else "inf" for x in self.class_shrinkage]  # JSON has no inf
        return d

    @classmethod
    def with_tasks(cls, tasks: dict[int, str], **kwargs) -> "RunConfig":
        """RunConfig.with_tasks({1: "posterior", 2: "posterior", 3: "label"}, ...)."""
        return cls(tasks=tuple(TaskConfig(int(k), v) for k, v in sorted(tasks.items())), **kwargs)
