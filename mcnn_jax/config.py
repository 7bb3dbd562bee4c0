"""The full set of config keys every experiment has, with defaults. Config files in ``configs/`` start from
``base_config()``, change what they need, and return it; ``ml_collections.config_flags`` loads them locked (so
a misspelt key is an error) and applies ``--config.KEY=VALUE`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import ml_collections

from mcnn_jax.model.mcnn import MCNN, MODEL_KEYS


def base_config() -> ml_collections.ConfigDict:
    """Every key, with its default: ``seed`` and the ``data``, ``model``, ``optim`` and ``train`` sections."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_defaults()
    # --- model: the M-CNN (mcnn_jax.model.mcnn.MCNN); every field of MCNN, with MCNN's defaults ---------------
    c.model = model_defaults()
    c.model.input_shape = (1024, 1280, 3)
    # model.num_classes is replaced by the store's number of classes at run time; model.impl: "native" (C++ CPU
    # kernels, compiled on first use), "fast" (XLA reformulated) or "xla"; the same function
    c.optim = optim_defaults()
    published_recipe(c)  # name, momentum, learning rates and schedule, label smoothing, weight decay
    c.train = train_defaults()
    return c


def data_defaults() -> ml_collections.ConfigDict:
    """The ``data`` section: a TensorStore image store (see mcnn_jax.data) or a generated synthetic screen."""
    c = ml_collections.ConfigDict()
    c.store = ""  # path of the store; "" means <workdir>/data/store
    c.synthetic = ml_collections.ConfigDict()  # generated into the workdir when the store is absent
    c.synthetic.enabled = False
    c.synthetic.num_images = 0
    c.synthetic.num_classes = 0
    c.synthetic.height = 1024
    c.synthetic.width = 1280
    c.synthetic.seed = 0
    # the camera (mcnn_jax.data.synthetic.Camera): "noisy" | "offset" | "flat" background, a full-well level in
    # counts (0 = off) and 16 | 12 | 8 bits; flat backgrounds, saturation and 8 bits are what real fields look like
    c.synthetic.background = "noisy"
    c.synthetic.saturation = 0
    c.synthetic.bits = 16
    c.synthetic.difficulty = 0.0  # 0..1: weaker, more variable phenotypes and more noise (a harder screen)
    # whole-well montages (mcnn_jax.data.montage): with grid "RxC" (e.g. "2x2") the sites of each well are stitched
    # into one image and training reads that montage store (one image per well); "" = off. A synthetic screen is
    # then generated with whole wells (num_images rounded up to a multiple of 4 x num_classes; grid 2x2, 1x4, 4x1)
    c.montage = ml_collections.ConfigDict()
    c.montage.grid = ""
    c.montage.order = "row"  # "row": site 1 top-left, left to right, row by row; "snake": rows 2, 4, ... right to left
    c.montage.skip_incomplete = False  # leave out wells that lack sites (default: an error naming them)
    # where the montage store goes; "" = beside data.store (<store>.montage-2x2-row) if that folder exists or the
    # store's folder is writable, else <workdir>/data/montage-2x2-row (mcnn_jax/data/prepare.py)
    c.montage.store = ""
    c.split = "random"  # "random" (seeded, stratified) or "compound" (leave one compound out)
    c.val_fraction = 0.2
    c.holdout_compound = ""  # with split="compound": the compound whose images are the validation set
    c.split_seed = 0
    c.augment = ml_collections.ConfigDict()
    c.augment.flips = True
    c.augment.rot180 = True
    c.augment.rot90 = False  # only for square images
    c.augment.intensity_jitter = 0.05
    c.prefetch = 2
    return c


def optim_defaults() -> ml_collections.ConfigDict:
    """The ``optim`` section's keys that the published recipe (``published_recipe``) does not set; durations in
    epochs (mcnn_jax.optim)."""
    c = ml_collections.ConfigDict()
    c.trust_coefficient = 0.001  # LARS
    c.eps = 1e-8
    c.b1 = 0.9  # AdamW and LAMB
    c.b2 = 0.999
    c.power = 2.0  # decay="polynomial"
    c.step_epochs = (30.0, 60.0)  # decay="step"
    c.step_gamma = 0.1
    c.epochs = 50.0
    # how the peak learning rate follows the global batch from base_lr at base_batch: "linear" (lr x batch /
    # base_batch, the published recipe), "sqrt" (x sqrt(batch / base_batch), usual for AdamW) or "none"
    c.lr_scaling = "linear"
    # the collapsed ensemble: after the main run's epochs, `cycles` cosine-restart cycles of `cycle_epochs` each,
    # restarting at cycle_base_lr (at base_batch, scaled like base_lr) and decaying to end_lr; the checkpoints at the
    # end of the main run and of each cycle are kept as snapshots (mcnn-eval --checkpoint snapshots averages them)
    c.cycles = 0
    c.cycle_epochs = 2.0
    c.cycle_base_lr = 0.004
    c.grad_clip = 0.0  # global-norm clipping; 0 = off
    return c


def train_defaults() -> ml_collections.ConfigDict:
    """The ``train`` section: the training loop, checkpoints, logging and the gradient exchange."""
    c = ml_collections.ConfigDict()
    c.global_batch = 32  # over all MPI ranks; each rank takes global_batch / ranks
    # a batch that grows during training (mcnn_jax.optim.batch_schedule): ((start epoch, global batch), ...) from epoch
    # 0,
    # ending at global_batch, e.g. ((0, 16), (10, 64), (20, 256)); the lr follows each phase's batch; () = constant
    c.batch_schedule = ()
    # images per micro-batch on each rank (0 = the whole local batch): the local batch runs in micro-batches
    # inside the one step (gradients accumulated), then one allreduce and one update; memory follows the micro-batch
    c.microbatch = 0
    c.max_steps = 0  # stop after this many steps (0 = the epochs' worth)
    c.eval_every_epochs = 1.0
    c.eval_batch = 0  # per rank; 0 = train.microbatch if set, else the per-rank training batch
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0  # 0 = at every evaluation
    c.keep_checkpoints = 3
    c.target_accuracy = 0.0  # stop when validation accuracy reaches it (0 = off)
    c.progress = "auto"  # auto (a bar on a terminal) | bar | log
    c.profile_steps = (0, 0)  # (first, last): a jax.profiler trace of these steps in <workdir>/profile
    # how ranks exchange gradients (mcnn_jax.parallel.exchange): "auto" (per dense layer the exact scheme sending
    # fewer bytes), "allreduce" (sum every gradient), "factored" (dense layers as inputs + output gradients, one
    # allgather) or "powersgd" (lossy: the dense kernels' gradients at rank powersgd_rank, with error feedback)
    c.comm = "auto"
    c.powersgd_rank = 4
    # sum the dense layers' gradients on a background thread while the branches' backward pass runs (a two-stage
    # backward, mcnn_jax.parallel.overlap; exact; not with "powersgd"; needs MPI_THREAD_MULTIPLE with several ranks)
    c.overlap = False
    return c


def restore_config(stored: dict) -> ml_collections.ConfigDict:
    """A stored run's config (``config.json``, a checkpoint's metadata) merged onto ``base_config()``: keys the
    run did not record (it predates them) take today's defaults, so no reader needs a fallback of its own.
    Tuples stored as JSON lists become tuples again; keys that ``base_config()`` no longer has are kept, and so is
    a stored value of another type than today's default."""
    config = base_config()

    def merge(target: ml_collections.ConfigDict, values: dict):
        for key, value in values.items():
            if key not in target:
                with target.unlocked():
                    target[key] = value
            elif isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(target[key], value)
            else:
                if isinstance(target[key], tuple) and isinstance(value, list):
                    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                try:
                    target[key] = value
                except TypeError:  # the run stored another type (e.g. per-branch remat flags): the run's value
                    with target.unlocked():
                        del target[key]
                        target[key] = value

    merge(config, stored)
    return config


def model_defaults() -> ml_collections.ConfigDict:
    """The ``model`` section: every field of ``MCNN`` with its default (the dtype as its name)."""
    fields = {f.name: f.default for f in dataclasses.fields(MCNN) if f.name in MODEL_KEYS}
    fields["dtype"] = jnp.dtype(fields["dtype"]).name
    return ml_collections.ConfigDict(fields)


# The published CPU recipe's optimizer keys; ``published_recipe`` applies them and ``base_config`` starts from them.
PUBLISHED_RECIPE = dict(
    name="nesterov",  # lars | nesterov (SGD, Nesterov momentum) | momentum (SGD, heavy ball; 0 = plain) | adamw | lamb
    momentum=0.9,
    nesterov=True,  # optim.nesterov: LARS's momentum kind (the SGD names say theirs)
    warmup_init_lr=0.001,
    base_lr=0.008,
    base_batch=32,  # the peak base_lr at base_batch, scaled linearly
    warmup_epochs=5.0,
    decay="linear",
    end_lr=1e-4,
    label_smoothing=0.1,
    weight_decay=5e-5,
)


def published_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The published CPU recipe (Intel, ISC 2019), applied to ``c`` in place: Nesterov momentum 0.9, a linear
    warmup from 0.001 to 0.008 over 5 epochs, then linear decay to 1e-4; label smoothing 0.1; weight decay 5e-5.
    The peak 0.008 is at ``optim.base_batch`` (32) and scales linearly with the global batch."""
    c.optim.update(PUBLISHED_RECIPE)
    return c


# --- loading a config file and applying command-line overrides ---------------------------------------------
def find_config_file(path: str) -> Path:
    """``path`` itself, or the project's ``configs/<path>.py`` when only a name (e.g. ``default``) is given."""
    p = Path(path)
    if p.is_file():
        return p
    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    for cand in (repo_configs / p.name, repo_configs / f"{p.name}.py"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in repo_configs.glob("*.py") if not q.name.startswith("_"))
    raise FileNotFoundError(f"no config file {path}" + (f"; the project's configs are {known}" if known else ""))


def config_module(path: str | Path):
    """The module of a config file, loaded by its path: how a config builds on another one beside it
    (``config_module(Path(__file__).with_name("bbbc021.py")).get_config()``), configs being files, not a package."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(f"_mcnn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config_flags(argv: Sequence[str], flag_values=None):
    """Parses ``argv`` (program name first) with absl flags and ``ml_collections.config_flags``: ``--config``
    is a config file (or the name of one in ``configs/``), ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``)
    overrides a key. Returns the ``FlagValues``; ``.config`` is the locked config. Other flags must be defined
    in ``flag_values`` beforehand. A misspelt key, a section set to a value or a value of the wrong type is a
    ValueError that names the key and what would do (the library's own errors, with a did-you-mean list)."""
    from absl import flags
    from ml_collections import config_flags

    argv = _resolve_config_path(list(argv))
    fv = flag_values if flag_values is not None else flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        default=None,
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
        help_string="a config file (configs/NAME.py) or a config name",
    )
    try:
        fv(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise _explain(argv, e) from None
    if fv.config is None:
        raise ValueError("no config given: --config configs/NAME.py")
    return fv


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of the config file, locks the result and applies ``KEY=VALUE`` overrides, as
    ``mcnn-train --config PATH --config.KEY=VALUE`` does."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must be KEY=VALUE")
    return parse_config_flags(["mcnn", f"--config={path}", *[f"--config.{o}" for o in overrides]]).config


def _resolve_config_path(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            argv[i + 1] = str(find_config_file(argv[i + 1]))
        elif arg.startswith("--config="):
            argv[i] = f"--config={find_config_file(arg.split('=', 1)[1])}"
    return argv


def _explain(argv: list[str], error: Exception) -> Exception:
    """The ValueError for a failed override: unknown key (with close matches), a section, or a wrong type."""
    overrides = [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]
    paths = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-config")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not overrides or not paths:
        return ValueError(str(error))
    return _explain_overrides(parse_config_flags(["mcnn", f"--config={paths[-1]}"]).config, argv, error)


def _explain_overrides(config, argv: list[str], error: Exception) -> Exception:
    """Why the ``--config.KEY=VALUE`` overrides in ``argv`` failed on ``config``."""
    overrides = [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]
    for key in overrides:
        if (problem := _key_error(config, key)) is not None:
            return problem
    bad = re.search(r"--config\.([\w.]+)=(.*?): (.*)", str(error))
    if bad:
        key, value, why = bad.groups()
        return _type_error(key, functools.reduce(lambda n, part: n[part], key.split("."), config), value, why)
    return ValueError(f"bad config override: {error}")


def _key_error(config, key: str) -> ValueError | None:
    """Why ``key`` cannot be set on ``config`` (an unknown key, with close matches, or a section), or None."""
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) and part in node else None
        if node is None:
            valid = all_keys(config)
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            return ValueError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid)}")
    if isinstance(node, ml_collections.ConfigDict):
        return ValueError(
            f"config key {key!r} is a section; set one of its keys: {', '.join(all_keys(node, key + '.'))}"
        )
    return None


def _type_error(key: str, current, value: str, why) -> ValueError:
    return ValueError(f"config key {key!r} takes a {type(current).__name__} (now {current!r}); got {value!r}: {why}")


def all_keys(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += all_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """``config`` with ``KEY=VALUE`` overrides (e.g. ``optim.b2=0.984``), parsed by the same
    ``ml_collections.config_flags`` parser as ``--config.KEY=VALUE`` on the command line (so values read as
    they do there), with the same errors (an unknown key with close matches, a section, a wrong type). The
    overrides are applied to ``config`` itself, which is returned locked."""
    from absl import flags
    from ml_collections import config_flags

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must be KEY=VALUE")
    argv = ["mcnn", *[f"--config.{o}" for o in overrides]]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise _explain_overrides(config, argv, e) from None
    return fv.config
