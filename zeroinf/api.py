"""The Python API: `zeroinf.load(...)` returns a Model whose `generate` streams the weights."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from zeroinf.engine import costmodel
from zeroinf.engine.autoplan import auto_plan, check_batch_args, host_available, whole_budget
from zeroinf.engine.costmodel import Budgets, Workload
from zeroinf.engine.distributed import RankGroup, group_from_env, rank_device
from zeroinf.engine.executor import Executor
from zeroinf.engine.gather import gathered_bytes
from zeroinf.engine.generate import DecodeState, GenerationConfig, GenerationStats, generate
from zeroinf.engine.kvcache import check_kv_dtype, check_kv_tier, kv_token_bytes, new_kv_cache
from zeroinf.engine.plan import Plan, make_plan
from zeroinf.engine.prefetcher import Prefetcher, Trace
from zeroinf.engine.probe import measure_h2d
from zeroinf.engine.refill import Request, generate_refill
from zeroinf.errors import CheckpointError, ConfigError, PlanError
from zeroinf.format import DTYPES, Checkpoint
from zeroinf.models import ModelConfig, get_family
from zeroinf.models.base import LayerKV
from zeroinf.sizes import fmt_bytes, parse_bytes

log = logging.getLogger("zeroinf")


class Model:
    """A loaded model. Use as a context manager, or call close() to free pinned and GPU memory."""

    def __init__(
        self,
        ckpt: Checkpoint,
        plan: Plan,
        device: torch.device,
        io_backend: str | None = None,
        trace: Trace | None = None,
        group: RankGroup | None = None,
        prefill_tokens: int = 2048,
        kv_dtype: str | None = None,
    ) -> None:
        self.checkpoint, self.plan, self.device, self.group = ckpt, plan, device, group
        self.prefill_tokens = prefill_tokens
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.micro_batch: int | None = plan.micro_batch  # decode rows per micro-batch (None: all)
        self.batch_size: int | None = plan.batch  # rows the plan serves (None: not planned)
        self.config = ModelConfig.from_hf(ckpt.config)
        self.family = get_family(self.config.model_type)
        self.dtype = DTYPES[ckpt.manifest.dtype]
        t0 = time.perf_counter()
        self.prefetcher = Prefetcher(
            ckpt, plan, device, io_backend=io_backend, trace=trace, group=group
        )
        self.load_s = time.perf_counter() - t0
        self.executor = Executor(self.prefetcher, self.family, self.config)
        self.last_stats: GenerationStats | None = None
        self._decode = DecodeState()  # KV cache and CUDA graphs, reused by same-shaped calls
        gen_cfg = ckpt.path / "generation_config.json"
        self._pad_default = _pad_token(ckpt.config, gen_cfg)

    # ---- generation ----

    def kv_bytes(self, batch: int, tokens: int) -> int:
        return batch * tokens * kv_token_bytes(self.config, self.dtype.itemsize, self.kv_dtype)

    def _new_kv(self, batch: int, tokens: int) -> list[LayerKV]:
        host = self.plan.kv_host_layers(self.config.num_layers)  # models/host_attention.py
        return new_kv_cache(self.config, batch, tokens, self.dtype, self.device, self.kv_dtype,
                            host)  # fmt: skip

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        seed: int | list[int] | None = None,
        pad_token_id: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Prompt + new tokens, [B, P + N] like transformers (left padded prompts with a mask;
        rows that stopped at an EOS are padded after it). N = max_new_tokens unless every row
        stopped earlier."""
        if self.prefetcher is None:
            raise ConfigError("model is closed")
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ConfigError(
                f"input_ids: need a non-empty [batch, length] tensor, got {tuple(ids.shape)}"
            )
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ConfigError(
                f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
            )
        if bool((mask[:, -1] == 0).any()):
            raise ConfigError("attention_mask: prompts must be left padded (last column all 1)")
        total = ids.shape[1] + max_new_tokens
        if total > self.config.max_positions:
            raise ConfigError(
                f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                f"exceeds the model's {self.config.max_positions} positions"
            )
        eos = _eos_ids(eos_token_id)
        gc = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos,
            seed=tuple(seed) if isinstance(seed, list) else seed,
            pad_token_id=self._pad_default if pad_token_id is None else pad_token_id,
        )  # fmt: skip
        if not self._decode.matches(ids.shape[0], total, self.micro_batch):
            self._decode.clear()  # another shape: free the last call's cache first
            self._check_kv_fits(ids.shape[0], total)
        passes = self.group.agree_passes(max_new_tokens) if self.group else None
        out, self.last_stats = generate(
            self.executor,
            ids.to(self.device, torch.long),
            mask.to(self.device, torch.long),
            gc,
            self._new_kv,
            progress=progress,
            passes=passes,
            prefill_tokens=self.prefill_tokens,
            decode_rows=self.micro_batch,
            cuda_graphs=self.plan.kv_tier == "gpu",  # a graph cannot capture host attention
            state=self._decode,
        )
        return out.to(ids.device)

    @torch.inference_mode()
    def generate_stream(
        self,
        prompts: Iterable[list[int] | Request],
        batch_size: int = 32,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        cache_tokens: int | None = None,
    ) -> Iterator[tuple[Request, list[int]]]:
        """Continuous refill (engine/refill.py): up to `batch_size` prompts in flight; when one
        finishes, the next prompt's prefill joins the running rows' decode in the same weight
        pass. Yields (request, new token ids) in the order rows finish; a prompt given as a
        list of ids becomes Request(ids, max_new_tokens, key=its index). Greedy results equal
        one-prompt-at-a-time generate(); sampled rows use their request's own seed.

        cache_tokens: KV cache length per row (default: twice the longest prompt + its new
        tokens, capped at the model's positions); a shorter cache, down to the longest request,
        saves memory for more rows at the price of more frequent compactions (each one copy of
        the cache). Under torchrun each rank streams its own prompts, agreeing with the other
        ranks before every forward pass; a rank whose prompts are done returns, and its next
        call or finish() keeps joining the others' passes."""
        if self.prefetcher is None:
            raise ConfigError("model is closed")
        reqs = [
            p if isinstance(p, Request) else Request(list(p), max_new_tokens, key=i)
            for i, p in enumerate(prompts)
        ]
        longest = max((len(r.ids) + r.max_new_tokens for r in reqs), default=1)
        if longest > self.config.max_positions:
            raise ConfigError(
                f"a prompt + its new tokens ({longest}) exceed the model's "
                f"{self.config.max_positions} positions"
            )
        eos = _eos_ids(eos_token_id)
        gc = GenerationConfig(
            max_new_tokens=1, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, eos_token_id=eos, pad_token_id=self._pad_default,
        )  # fmt: skip
        cache = min(self.config.max_positions, 2 * longest)  # room to compact rarely
        if cache_tokens is not None:
            if not longest <= cache_tokens <= self.config.max_positions:
                raise ConfigError(
                    f"cache_tokens {cache_tokens}: must hold the longest prompt + new tokens "
                    f"({longest}) and fit the model's {self.config.max_positions} positions"
                )
            cache = cache_tokens
        self._decode.clear()  # generate()'s cache of the last call: free it for this one's
        self._check_kv_fits(batch_size, cache)
        yield from generate_refill(
            self.executor, reqs, gc, batch_size, self._new_kv, self.device, cache, self.group
        )

    def _check_kv_fits(self, batch: int, tokens: int) -> None:
        layers = self.config.num_layers
        on_host = len(self.plan.kv_host_layers(layers))
        per_layer = self.kv_bytes(batch, tokens) // layers
        if on_host:
            _check_host_kv(per_layer * on_host, batch, tokens)
        if self.device.type != "cuda" or on_host == layers:
            return
        need = per_layer * (layers - on_host)
        free, _ = torch.cuda.mem_get_info(self.device)
        # blocks torch keeps cached (an earlier call's KV cache) are free for this one
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if need > free:
            raise PlanError(
                f"KV cache for batch {batch} x {tokens} tokens needs {fmt_bytes(need)}, but only "
                f"{fmt_bytes(free)} is free on {self.device} after "
                f"{fmt_bytes(self.plan.gpu_weight_bytes)} of weights; lower the batch or gpu_memory"
            )

    # ---- lifetime ----

    def finish(self) -> None:
        """With ranks: this rank has no more prompts. It keeps joining the other ranks' forward
        passes (streaming, not computing) until every rank of the group is done. close() calls
        it; a single process returns at once."""
        if self.group is None or self.prefetcher is None:
            return
        while passes := self.group.agree_passes(0):
            for _ in range(passes):
                self.executor.skip_pass()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.finish()
            self._decode.clear()
            self.executor.release_views()  # the cached views would keep the buffers alive
            self.prefetcher.close()
            self.prefetcher = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_host_kv(need: int, batch: int, tokens: int) -> None:
    """A host ("cpu" tier) KV cache must fit in the memory the host has available now."""
    have = host_available()
    if need > have:
        raise PlanError(
            f"KV cache for batch {batch} x {tokens} tokens needs {fmt_bytes(need)} of host "
            f"memory (the host KV tier), but only {fmt_bytes(have)} is available; lower the batch"
        )


def _eos_ids(eos_token_id: int | list[int] | None) -> tuple[int, ...]:
    """None: no end-of-sequence token (generate exactly max_new_tokens); an id or a list."""
    if eos_token_id is None:
        return ()
    return tuple(torch.as_tensor(eos_token_id).flatten().tolist())


def _pad_token(config: dict[str, Any], gen_cfg: Path) -> int:
    pad = config.get("pad_token_id")
    if pad is None and gen_cfg.is_file():
        import json

        pad = json.loads(gen_cfg.read_text()).get("pad_token_id")
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return int(pad) if pad is not None else 0


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "cuda:0",
    offload: str = "cpu",
    gpu_memory: int | str | None = "12GiB",
    cpu_memory: int | str | None = None,
    nvme_dir: str | os.PathLike[str] | None = None,
    prefetch: int = 2,
    dtype: str | torch.dtype | None = None,
    io_backend: str | None = None,
    progress: bool = True,
    trace: Trace | None = None,
    prefill_tokens: int = 2048,
    kv_dtype: str | None = None,
    batch_size: int | str | None = None,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
    max_batch_size: int = 1024,
    kv_tier: str | None = None,
) -> Model:
    """Load a zeroinf checkpoint (or a plain Hugging Face folder, converted once into a cache
    folder) for layer-streaming generation. See README.md for every argument."""
    from zeroinf.convert import ensure_converted

    device = rank_device(torch.device(device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available (use device='cpu')")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = group_from_env(device)
    if offload not in ("cpu", "nvme"):
        raise ConfigError(f"offload={offload!r}: must be 'cpu' or 'nvme'")
    check_kv_dtype(kv_dtype)
    check_kv_tier(kv_tier)
    auto = check_batch_args(batch_size, prompt_len, max_new_tokens)
    dtype_name = _dtype_name(dtype)
    cache = Path(nvme_dir) if offload == "nvme" and nvme_dir is not None else None
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if first:  # one rank converts a plain HF folder; the others wait and reuse it
        ckpt_path = ensure_converted(path, dtype=dtype_name, cache_dir=cache, progress=progress)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not first:
        ckpt_path = ensure_converted(path, dtype=dtype_name, cache_dir=cache, progress=False)
    ckpt = Checkpoint(ckpt_path)
    if dtype_name is not None and ckpt.manifest.dtype != dtype_name:
        raise ConfigError(
            f"dtype={dtype_name}: checkpoint {ckpt_path} holds {ckpt.manifest.dtype}; "
            f"convert it with `zeroinf-convert SRC DST --dtype {dtype_name}`"
        )
    _check_shapes(ckpt)
    if auto:
        # gpu_memory is the whole device budget: the planner sizes weights, KV and batch in it
        work = Workload(prompt_len, max_new_tokens, prefill_tokens, max_batch_size)
        budgets = Budgets(whole_budget(gpu_memory, device), parse_bytes(cpu_memory, "cpu_memory"),
                          offload, prefetch, group.world if group else 1)  # fmt: skip
        plan = auto_plan(ckpt, device, work, budgets, kv_dtype, io_backend, kv_tier=kv_tier)
    else:
        budget = parse_bytes(gpu_memory, "gpu_memory")
        h2d = measure_h2d(device) if device.type == "cuda" else None
        world = group.world if group else 1
        plan = weights_plan(ckpt, budget, offload, prefetch, device, world, prefill_tokens, h2d)
        if batch_size is not None:  # the rows it serves, one micro-batch; the budget as above
            plan = dataclasses.replace(plan, micro_batch=batch_size)
        check_kv_tier(kv_tier, planned=False)
        plan = dataclasses.replace(plan, kv_tier=kv_tier or "gpu")
    cpu_budget = parse_bytes(cpu_memory, "cpu_memory")
    host = plan.host_unit_bytes(per_rank=False) + plan.kv_host_bytes  # and a host KV cache
    if cpu_budget is not None and host > cpu_budget:
        raise PlanError(
            f"cpu_memory {fmt_bytes(cpu_budget)} cannot hold the {fmt_bytes(host)} of units the "
            "plan keeps in host memory; raise cpu_memory, gpu_memory, or use offload='nvme'"
        )
    _check_host_memory(plan, device)
    log.info("%s", plan)
    return Model(ckpt, plan, device, io_backend=io_backend, trace=trace, group=group,
                 prefill_tokens=prefill_tokens, kv_dtype=kv_dtype)  # fmt: skip


def weights_plan(
    ckpt: Checkpoint, budget: int | None, offload: str, prefetch: int, device: torch.device,
    world: int, prefill_tokens: int, h2d_bytes_per_s: float | None = None,
) -> Plan:  # fmt: skip
    """The plan for a given batch size: `budget` holds resident units, streaming slots and (on
    a GPU) the activations of one prefill chunk (decode's are smaller); the KV cache comes on
    top. The embed unit's table stays on the host when anything streams (engine/gather.py).
    budget None: everything resident."""
    itemsize = DTYPES[ckpt.manifest.dtype].itemsize
    cfg = ModelConfig.from_hf(ckpt.config)
    workspace = workspace_bytes(cfg, itemsize, prefill_tokens) if device.type == "cuda" else 0
    units = [(u.name, u.nbytes) for u in ckpt.units]
    if budget is None:
        budget = sum(nb for _, nb in units) + workspace
    return make_plan(units, budget, offload, prefetch, str(device), h2d_bytes_per_s, world,
                     workspace, gathered=gathered_bytes(ckpt))  # fmt: skip


def _check_shapes(ckpt: Checkpoint) -> None:
    """Every stored tensor has the shape its config implies (transformers' own model, built on
    the meta device, says which): a manifest is untrusted input, and a weight reshaped to the
    same byte count would otherwise fail deep inside the first matmul."""
    from zeroinf.synthetic import hf_shapes

    try:
        shapes = hf_shapes(ckpt.config)
    except Exception as e:  # a config transformers cannot build: ModelConfig accepted it
        log.warning("%s: tensor shapes not checked (transformers: %s)", ckpt.path, e)
        return
    for u in ckpt.units:
        for t in u.tensors:
            want = shapes.get(t.name)
            if want is not None and tuple(t.shape) != want:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {t.name!r} (unit {u.name!r}) has shape "
                    f"{list(t.shape)}, but the config implies {list(want)}"
                )


def _check_host_memory(plan: Plan, device: torch.device) -> None:
    """Host bytes the plan will allocate (the CPU tier; every unit when the device is the CPU)
    must fit in the memory the host has available, before anything is allocated."""
    need = plan.host_unit_bytes(per_rank=True) + plan.kv_host_bytes
    if device.type == "cpu":
        need += plan.resident_bytes
    have = host_available()
    if need > have:
        raise PlanError(
            f"host memory: the plan keeps {fmt_bytes(need)} in host memory but only "
            f"{fmt_bytes(have)} is available; use offload='nvme' or a smaller model"
        )


def workspace_bytes(cfg: ModelConfig, itemsize: int, tokens: int) -> int:
    """Device bytes for the activations of `tokens` tokens inside one unit, plus logits and
    sampling buffers for up to 256 rows (engine/costmodel.py)."""
    return costmodel.workspace_bytes(cfg, itemsize, tokens)


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype={dtype!r}: use float32, float16 or bfloat16")
    return name
