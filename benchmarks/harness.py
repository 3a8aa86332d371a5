"""Measure PEFT methods side by side, in one run, on one model.

For every :class:`Candidate` (a modalpeft config, any ``peft.PeftConfig``, or one of the baselines ``"full"``,
``"head_only"`` and ``"floor"``), :func:`measure` builds a fresh model, trains it for a few steps on one synthetic
batch and records what the method costs: trainable parameters, adapter file size, the activation bytes autograd
saves and the training state, peak training memory, median training-step time, inference time after merging, and
an optional metric. Ratios against full fine-tuning, the head-only baseline, the floor and peft's LoRA (the
candidate named ``"lora"``) are added when those candidates ran.

The machine is noisy, so only ratios within one run mean much; nothing here is asserted in tests.

How each number is measured:

- ``step_time``: median over the ``steps`` warm steps (after ``warmup`` steps) of forward + loss + backward +
  ``AdamW.step`` + ``zero_grad``, on the same batch each step (``torch.cuda.synchronize`` around it on a GPU).
- ``saved_bytes``: the bytes autograd saves for backward in one training step (forward + loss), counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, the model's own parameters and buffers left out
  (they are resident whatever trains). Deterministic: it depends on the model, the batch and the method, not on the
  allocator or on what else runs on the machine. ``train_state_bytes``: the trainable parameters, their gradients
  and the optimizer's state (AdamW: two moments). ``train_bytes`` is their sum, the training memory a method adds
  to the frozen model.
- the *floor* (candidate ``"floor"``): the frozen model with backward running through every block and nothing
  trained inside it (only ``modules_to_save``, the head, trains; the first block's input requires grad, see
  ``floor_from``). Its ``saved_bytes`` are the activations any method that trains inside the network
  must keep; ``saved_bytes_vs_floor`` says how far above that a method is.
- ``peak_memory``: growth above the resting footprint of the built model (weights and adapters), over the
  untimed warm-up steps (at least one; the timed steps follow them): gradients, optimizer state and activations.
  On CPU it is the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is
  built) minus its RSS then; where that reset is unavailable, ``ru_maxrss`` is used instead (it also counts peaks
  before the model was built). In an isolated candidate on glibc, those steps run under
  :func:`modalpeft.lightning.memory.exact_heap` (tensors of 1 MiB and more get pages of their own, returned when
  freed), so the peak is the most memory alive at once, not how the heap happened to reuse freed tensors (with
  glibc's default, two runs of LoRA read 1.11 and 1.35 GiB); the timed steps run with the threshold where the
  default settles in a training loop (32 MiB). On CUDA it is ``max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus ``memory_allocated`` then.
  With ``isolate=True`` (the default) each candidate runs in a fresh spawned process, so no peak, cache or
  allocator state leaks from one candidate to the next; ``isolate=False`` measures in this process (faster,
  for tests; its CPU memory numbers are less accurate). On CPU the growth includes the runtime's one-time
  lazy allocations of a first training step (about 20 MiB, as a tiny ViT shows).
- ``file_size``: bytes written by ``save_adapter`` (an adapter plus its ``modules_to_save``); for ``"full"``
  the safetensors file of the whole model, for ``"head_only"`` that of the ``modules_to_save``.
- ``merged_infer_time``: median forward time over ``steps`` forwards (after one untimed forward), in eval
  mode under ``torch.inference_mode``, after ``merge_and_unload`` when the method is mergeable
  (``merged: true``), else of the unmerged adapted model.
  The baselines are plain models (``infer_mode: "plain"``).

Each record also holds the device, torch version, thread count and the 1-minute load average at the
candidate's start: with more runnable processes than cores, CPU timings (multi-threaded ones above all) can
be many times slower, so a high ``load_avg`` marks numbers to distrust.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.core.inject import modules_to_save_modules
from modalpeft.core.peft_bridge import is_peft_config
from modalpeft.lightning.memory import MemoryProbe, exact_heap

Baseline = Literal["full", "head_only", "floor"]
BASELINES: tuple[str, ...] = ("full", "head_only", "floor")
REFERENCES: tuple[str, ...] = ("full", "head_only", "floor", "lora")
"""Candidate names that other candidates are compared against, when present in a run."""
RATIO_FIELDS: tuple[str, ...] = (
    "trainable_params", "file_size", "saved_bytes", "train_bytes", "peak_memory", "step_time", "merged_infer_time",
)  # fmt: skip
"""Each gets ``<field>_vs_<reference>`` = candidate value / reference value in every record."""

ModelFactory = Callable[[], nn.Module]
BatchFactory = Callable[[], tuple[Any, Tensor]]
LossFn = Callable[[Any, Tensor], Tensor]


@dataclass(frozen=True)
class Candidate:
    """One entry of a benchmark run.

    Args:
        name: the name in the records and the table (``"lora"`` is the reference for ``*_vs_lora``).
        config: a modalpeft config (``mp.BitFitConfig()``), any ``peft.PeftConfig``, ``"full"`` (every
            parameter trains), ``"head_only"`` (a linear probe: only ``modules_to_save`` train) or ``"floor"``
            (as ``"head_only"``, with backward through every block: see the module docstring).
        modules_to_save: this candidate's own ``modules_to_save`` in place of the run's (``None``: the run's); with
            ``"head_only"`` it trains exactly these modules (e.g. full fine-tuning of a UNet's attention).
    """

    name: str
    config: Any
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.config, str) and self.config not in BASELINES:
            raise ValueError(
                f"Candidate {self.name!r}: config={self.config!r} is not a baseline; use one of {list(BASELINES)} "
                "or pass a modalpeft / peft config object."
            )
        if not isinstance(self.config, (str, mp.AdapterConfig)) and not is_peft_config(self.config):
            raise TypeError(
                f"Candidate {self.name!r}: config must be a modalpeft config, a peft.PeftConfig or one of "
                f"{list(BASELINES)}, got {type(self.config).__name__}."
            )

    @property
    def kind(self) -> Literal["full", "head_only", "floor", "native", "peft"]:
        if isinstance(self.config, str):
            return self.config  # type: ignore[return-value]
        return "peft" if is_peft_config(self.config) else "native"


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Job:
    """Everything one candidate's measurement needs; picklable, to cross into a spawned process."""

    model_factory: ModelFactory
    candidate: Candidate
    batch_factory: BatchFactory
    loss_fn: LossFn
    steps: int
    warmup: int
    device: str
    modules_to_save: tuple[str, ...]
    evaluate: Callable[[nn.Module], float] | None
    seed: int
    threads: int
    lr: float
    isolated: bool
    floor_from: str | None = None


def measure(
    model_factory: ModelFactory,
    candidates: Sequence[Candidate],
    *,
    batch_factory: BatchFactory,
    loss_fn: LossFn,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    run_name: str = "bench",
    run_info: Mapping[str, Any] | None = None,
    isolate: bool = True,
    threads: int | None = None,
    seed: int = 0,
    lr: float = 1e-3,
    on_error: Literal["raise", "record"] = "raise",
    progress: bool = False,
    floor_from: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every candidate on a fresh model from ``model_factory``; one record (a dict) per candidate.

    Args:
        model_factory: builds the base model (on CPU); called once per candidate after ``torch.manual_seed``.
        candidates: what to compare; names must be unique.
        batch_factory: returns ``(inputs, targets)``; ``inputs`` is a tensor, a tuple (positional arguments)
            or a mapping (keyword arguments). One batch is drawn per candidate (same seed) and reused each step.
        loss_fn: ``loss_fn(outputs, targets)`` -> a scalar tensor.
        steps: warm training steps timed (and inference forwards timed).
        warmup: steps run first and not timed.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; ``None``: the GPU when there is one.
        modules_to_save: modules trained in place by every candidate but ``"full"`` (e.g. ``["head"]``).
        evaluate: ``evaluate(model) -> float`` on the trained model (eval mode, before merging), recorded as
            ``metric``; ``None`` records ``metric: None`` (a cost-only run).
        out_dir: when given, the records are written to ``<out_dir>/<run_name>.json`` (see :func:`write_json`).
        run_name: the JSON file's stem.
        run_info: extra facts about the run (model name, batch size) stored in the JSON's ``"run"``.
        isolate: measure each candidate in a fresh spawned process (accurate memory; the factories and
            ``evaluate`` must then be picklable, e.g. module-level functions or ``functools.partial``).
            ``False`` measures in this process: faster, but CPU peak memory is then less accurate.
        threads: ``torch.set_num_threads`` value, recorded; ``None``: the cores this process may use.
        seed: seed of the model, the adapter initialisation and the batch.
        lr: AdamW learning rate.
        on_error: ``"raise"`` stops at the first failing candidate; ``"record"`` stores ``error`` in its record
            (numbers ``None``) and goes on.
        progress: print one line per candidate to stderr.
        floor_from: where the ``"floor"`` candidate's backward starts: the module whose inputs require grad (the
            first block, e.g. ``"blocks.0"``); ``None``: the model's inputs (the first embedding's output for
            token inputs).
    """
    names = [c.name for c in candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"candidate names must be unique; {duplicates} appear more than once.")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0.")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error={on_error!r} is not valid; use 'raise' or 'record'.")
    device = device or default_device()
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    records = []
    for i, candidate in enumerate(candidates):
        saved = candidate.modules_to_save if candidate.modules_to_save is not None else modules_to_save
        job = _Job(
            model_factory, candidate, batch_factory, loss_fn, steps, warmup, device,
            tuple(saved or ()), evaluate, seed, threads, lr, isolate, floor_from,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            record = _run_isolated(job) if isolate else _measure_one(job)
        except Exception as err:
            if on_error == "raise":
                raise
            record = _failed_record(job, err)
        record["wall_time"] = time.perf_counter() - start
        records.append(record)
        if progress:
            print(f"[{i + 1}/{len(candidates)}] {_progress_line(record)}", file=sys.stderr, flush=True)
    add_ratios(records)
    if out_dir is not None:
        info = {
            "steps": steps, "warmup": warmup, "device": device, "threads": threads, "seed": seed, "lr": lr,
            "isolated": isolate, "torch_version": torch.__version__, **(run_info or {}),
        }  # fmt: skip
        write_json(Path(out_dir) / f"{run_name}.json", records, info)
    return records


def add_ratios(records: list[dict[str, Any]], references: Sequence[str] = REFERENCES) -> None:
    """Add ``<field>_vs_<ref>`` for each of :data:`RATIO_FIELDS` and each reference candidate present."""
    by_name = {r["method"]: r for r in records}
    for ref in references:
        if ref not in by_name:
            continue
        base = by_name[ref]
        for record in records:
            for field in RATIO_FIELDS:
                record[f"{field}_vs_{ref}"] = _ratio(record.get(field), base.get(field))


def write_json(path: str | os.PathLike[str], records: list[dict[str, Any]], run_info: Mapping[str, Any]) -> Path:
    """Write ``{"run": run_info, "records": records}`` to ``path`` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": dict(run_info), "records": records}, indent=2, default=_jsonable) + "\n")
    return path


# -- one candidate ------------------------------------------------------------------------------------------
def _run_isolated(job: _Job) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_one, job).result()


def _measure_one(job: _Job) -> dict[str, Any]:
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    # the allocator returning freed tensors to the system (exact_heap, CPU) from the model's build through the
    # untimed warm-up steps: what adapting allocated and freed (SPT's sensitivity pass keeps every weight's gradient
    # for a while) leaves no free heap pages that the warm-up's peak then grows around or into; the timed steps
    # follow with the allocator as a training loop leaves glibc's
    with exact_heap() if device.type == "cpu" and job.isolated else contextlib.nullcontext(False) as exact:
        torch.manual_seed(job.seed)
        model, adapted = _build(job.model_factory(), job.candidate, list(job.modules_to_save), job.floor_from)
        model.to(device).train()
        params = {id(p): p for p in model.parameters()}.values()
        trainable = [p for p in params if p.requires_grad]
        n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in params)
        if n_trainable == 0:
            raise ValueError(f"candidate {job.candidate.name!r} has no trainable parameter (modules_to_save empty?)")

        torch.manual_seed(job.seed + 1)
        inputs, targets = _to_device(job.batch_factory(), device)
        optimizer = torch.optim.AdamW(trainable, lr=job.lr)

        def step(optimizer: torch.optim.Optimizer) -> float:
            _sync(device)
            start = time.perf_counter()
            loss = job.loss_fn(_forward(model, inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            return time.perf_counter() - start

        # the memory over the untimed warm-up steps (at least one), still under exact_heap
        probe = MemoryProbe(device)
        probe.start()
        for _ in range(max(job.warmup, 1)):
            step(optimizer)
        peak_memory = probe.peak_growth()
    step_times = [step(optimizer) for _ in range(job.steps)]
    saved = saved_activation_bytes(model, inputs, targets, job.loss_fn)
    state = training_state_bytes(trainable, optimizer)
    del optimizer

    file_size = _file_size(model, adapted, job.candidate, list(job.modules_to_save))
    model.eval()
    metric = float(job.evaluate(model)) if job.evaluate is not None else None

    infer_mode = "plain" if adapted is None else "unmerged"
    if adapted is not None and _mergeable(job.candidate.config):
        model, infer_mode = adapted.merge_and_unload(), "merged"
    infer_times = _time_inference(model.eval(), inputs, job.steps, device)

    return {
        **_context(job),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "trainable_percent": 100.0 * n_trainable / n_total,
        "file_size": file_size,
        "saved_bytes": saved,
        "train_state_bytes": state,
        "train_bytes": saved + state,
        "peak_memory": peak_memory,
        "peak_memory_kind": probe.kind + (", 1 MiB mmap threshold" if exact else ""),
        "model_memory": probe.baseline,
        "step_time": statistics.median(step_times),
        "step_times": step_times,
        "merged_infer_time": statistics.median(infer_times),
        "infer_times": infer_times,
        "merged": infer_mode == "merged",
        "infer_mode": infer_mode,
        "metric": metric,
        "error": None,
    }


def _context(job: _Job) -> dict[str, Any]:
    device = torch.device(job.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "method": job.candidate.name,
        "kind": job.candidate.kind,
        "config": _describe(job.candidate.config),
        "device": job.device,
        "device_name": name,
        "torch_version": torch.__version__,
        "threads": job.threads,
        "seed": job.seed,
        "steps": job.steps,
        "warmup": job.warmup,
        "isolated": job.isolated,
        "load_avg": _load_avg(),
    }


def _failed_record(job: _Job, err: Exception) -> dict[str, Any]:
    numbers = ["trainable_params", "total_params", "trainable_percent", "file_size", "saved_bytes", "train_state_bytes"]
    numbers += ["train_bytes", "peak_memory"]
    numbers += ["step_time", "merged_infer_time", "metric", "merged"]
    return {**_context(job), **dict.fromkeys(numbers), "error": f"{type(err).__name__}: {err}"}


def _build(
    model: nn.Module, candidate: Candidate, modules_to_save: list[str], floor_from: str | None = None
) -> tuple[nn.Module, Any]:
    """The model to train and, for adapter candidates, the :class:`AdaptedModel` (else ``None``)."""
    if candidate.config == "full":
        model.requires_grad_(True)
        return model, None
    if candidate.config in ("head_only", "floor"):
        model.requires_grad_(False)
        for _, module in modules_to_save_modules(model, modules_to_save):
            module.requires_grad_(True)
        if candidate.config == "floor":
            _backward_through_every_block(model, floor_from)
        return model, None
    adapted = mp.adapt(model, candidate.config, modules_to_save=modules_to_save or None)
    return adapted, adapted


def _backward_through_every_block(model: nn.Module, start: str | None) -> None:
    """Make backward run through the frozen ``model`` from ``start`` (a module name, e.g. ``"blocks.0"``: its
    floating-point inputs become leaves that require grad at every call) or, without ``start``, from the model's own
    floating-point inputs, or, for token inputs, from the first ``nn.Embedding``'s output."""

    def inputs_require_grad(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def leaf(x: Any) -> Any:
            return x.detach().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point() else x

        return tuple(leaf(a) for a in args), {k: leaf(v) for k, v in kwargs.items()}

    def output_requires_grad(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)

    if start is not None:
        try:
            host = model.get_submodule(start)
        except AttributeError as err:
            raise ValueError(f"floor_from={start!r} is not a module of {type(model).__name__}: {err}") from err
        host.register_forward_pre_hook(inputs_require_grad, with_kwargs=True)
        return
    model.register_forward_pre_hook(inputs_require_grad, with_kwargs=True)
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        embedding.register_forward_hook(output_requires_grad)


def saved_activation_bytes(model: nn.Module, inputs: Any, targets: Tensor, loss_fn: LossFn) -> int:
    """The bytes autograd saves for backward in one forward + loss of ``model`` in its current mode, each storage
    counted once, the model's parameters and buffers excluded (they are resident anyway). Runs the backward too
    (to free the graph) and clears the gradients it made; the parameters do not change."""
    with saved_storages(model) as saved:
        loss = loss_fn(_forward(model, inputs), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(nbytes for _, nbytes in saved.values())


@contextlib.contextmanager
def saved_storages(model: nn.Module, label: Callable[[], str] = lambda: "") -> Iterator[dict[int, tuple[str, int]]]:
    """Record what autograd saves for backward while the block runs: ``{storage pointer: (label(), bytes)}``, each
    storage once (the label of its first save, the largest size seen), ``model``'s parameters and buffers left out."""
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, tuple[str, int]] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in resident:
            first, nbytes = saved.get(pointer, (label(), 0))
            saved[pointer] = (first, max(nbytes, storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def training_state_bytes(trainable: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the trainable parameters, their gradients (one per parameter) and the optimizer's state tensors."""
    params = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(
        value.numel() * value.element_size()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, Tensor)
    )
    return 2 * params + state


def _mergeable(config: Any) -> bool:
    if is_peft_config(config):
        return not getattr(config, "is_prompt_learning", False)
    return mp.get_method(config.method).mergeable


def _file_size(model: nn.Module, adapted: Any, candidate: Candidate, modules_to_save: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if adapted is not None:
            adapted.save_adapter(Path(tmp) / "adapter")
        elif candidate.config == "full":
            save_model(model, str(Path(tmp) / "model.safetensors"))  # handles tied weights
        else:
            state = {
                f"{name}.{key}": value.detach().cpu().contiguous()
                for name, module in modules_to_save_modules(model, modules_to_save)
                for key, value in module.state_dict().items()
            }
            save_file(state, str(Path(tmp) / "head.safetensors"))
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def _time_inference(model: nn.Module, inputs: Any, steps: int, device: torch.device) -> list[float]:
    """Forward times of ``steps`` calls after one untimed call."""
    times = []
    with torch.inference_mode():
        for step in range(1 + steps):
            _sync(device)
            start = time.perf_counter()
            _forward(model, inputs)
            _sync(device)
            if step >= 1:
                times.append(time.perf_counter() - start)
    return times


# -- helpers ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _load_avg() -> float | None:
    """The 1-minute system load average when the candidate started (a noisy-machine warning sign)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _describe(config: Any) -> Any:
    """The candidate's config as JSON-ready data."""
    if isinstance(config, str):
        return config
    return json.loads(json.dumps(config.to_dict(), default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _progress_line(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"{record['method']}: FAILED {record['error']}"
    return (
        f"{record['method']}: {record['trainable_params']:,} trainable, step {record['step_time']:.3f} s, "
        f"peak +{record['peak_memory'] / 2**20:.0f} MiB, infer {record['merged_infer_time']:.3f} s "
        f"({record['infer_mode']}), {record['wall_time']:.0f} s"
    )
