"""The frozen teacher: load it, run it, and reduce its logits to what the cache stores.

The masked-LM head is split at its last linear layer (the decoder): the model runs up to the
decoder input, and the decoder is applied here in chunks of positions, each chunk reduced at once
(top-k, then the log-partition at every temperature from a single exp) while it is still in
cache. The (B, T, V) logit tensor is never built, which is what keeps the dump close to the
bare forward pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.pipeline.compiling import Compile, compiled
from kdpipe.pipeline.device import autocast
from kdpipe.pipeline.errors import KdpipeError, first_line, tensor_file_errors


@dataclass(frozen=True)
class TeacherOutputs:
    """Results for a batch: `hidden` at every non-padding position, targets at the target positions
    (all of them, or the masked ones), both in row-major order. Fields of other modes are None."""

    hidden: np.ndarray  # (N, d) float32, last hidden state through the projection
    hidden_layers: np.ndarray | None = None  # (N, n * d) float32, other layers' states, each through its own
    relation: np.ndarray | None = None  # (N, n * D) float32, one layer's attention projections (relation_targets)
    topk_ids: np.ndarray | None = None  # (P, k) int64, by decreasing logit
    topk_logits: np.ndarray | None = None  # (P, k) float32, raw (temperature 1)
    log_z: np.ndarray | None = None  # (P, n_T) float32, log sum_v exp(z_v / T), full vocabulary
    sample_ids: np.ndarray | None = None  # (S,) distinct draws, ascending per position
    sample_counts: np.ndarray | None = None  # (S,)
    sample_len: np.ndarray | None = None  # (P,) distinct draws per position
    teacher_state: np.ndarray | None = None  # (P, H') float32, the decoder's input


def resolve_model_path(spec: str) -> str:
    """builtin:NAME fetched, a folder as is, a model id left to the local Hugging Face cache."""
    if spec.startswith("builtin:"):
        from kdpipe.pipeline import builtin

        return builtin.resolve(spec, "teacher")
    if spec.startswith(("/", "./", "../", "~")) and not Path(spec).expanduser().exists():
        raise KdpipeError(f"model folder {spec} does not exist")
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise KdpipeError(f"cannot load a tokenizer from {path}: {first_line(e)}") from None
    for name in ("mask_token_id", "cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tok, name) is None:
            raise KdpipeError(f"tokenizer of {path} has no {name.removesuffix('_id')}; "
                              "kdpipe needs a BERT-style masked-LM tokenizer")
    return tok


def load_model_config(path: str) -> Any:
    """The teacher's config alone (mode none reads no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise KdpipeError(f"cannot load a model config from {path}: {first_line(e)}") from None


def save_head(path: Path, decoder: nn.Linear) -> None:
    """The frozen decoder of the exact mode: logits = state @ weight.T + bias."""
    from safetensors.torch import save

    from kdpipe.pipeline.fsutil import atomic_write_bytes

    tensors = {"weight": decoder.weight.detach().float().contiguous()}  # (V, H')
    if decoder.bias is not None:
        tensors["bias"] = decoder.bias.detach().float().contiguous()  # (V,)
    atomic_write_bytes(path, save(tensors))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading messages ("newly initialised weights", ...) and progress bars off."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_masked_lm(path: str) -> tuple[nn.Module, list[str]]:
    """An `AutoModelForMaskedLM` from a local folder in eval mode, and the weights it lacked (a
    missing head starts random); transformers' own errors are the caller's to word."""
    from transformers import AutoModelForMaskedLM

    with quiet_transformers(), tensor_file_errors(Path(path)):  # a pickle: one line naming the file
        model, info = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True,
                                                           output_loading_info=True)
    return model.eval(), list(info.get("missing_keys", []))


def load_teacher(path: str, allow_missing_head: bool = False) -> nn.Module:
    """The teacher in eval mode, refusing checkpoints whose head would be random."""
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise KdpipeError(f"teacher {path} is not a model folder (no config.json)")
    try:
        model, missing = load_masked_lm(path)
    except ValueError as e:
        raise KdpipeError(f"teacher {path} is not a masked language model: {first_line(e)}") from None
    except OSError as e:
        raise KdpipeError(f"cannot load teacher {path}: {first_line(e)}") from None
    if missing and not allow_missing_head:
        raise KdpipeError(
            f"teacher {path} has no trained masked-LM head ({len(missing)} weights missing, e.g. "
            f"{missing[0]}): its logits would be random; give it a head with `kdpipe teacher-adapt`"
        )
    return model


def weights_sha256(model: nn.Module) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes), whatever file held them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of the vocabulary and special tokens: equal hashes tokenize text identically."""
    h = hashlib.sha256(type(tokenizer).__name__.removesuffix("Fast").encode())
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    return h.hexdigest()


def decoder_of(model: nn.Module, role: str = "teacher") -> nn.Linear:
    """The masked-LM head's last linear layer; `role` names the model in the error ("student x")."""
    dec = model.get_output_embeddings()
    if not isinstance(dec, nn.Linear):
        raise KdpipeError(f"{role}'s output layer is {type(dec).__name__}, not a linear decoder; "
                          "kdpipe supports BERT-style masked-LM heads")
    return dec


@contextmanager
def decoder_bypassed(model: nn.Module) -> Iterator[nn.Linear]:
    """Within the block the model's 'logits' are the decoder's input (B, T, H)."""
    dec = decoder_of(model)
    dec.forward = lambda x: x  # instance attribute shadows nn.Linear.forward
    try:
        yield dec
    finally:
        del dec.forward


TOPK_BLOCK = 64  # logits per block of the blocked top-k


def topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest logits of each row of a (C, V) chunk, by falling value.

    Exact, and several times faster than torch.topk over a 30k vocabulary on CPU: the k largest
    of a row lie in its k blocks (of TOPK_BLOCK logits) with the largest maxima, so torch.topk
    runs on the block maxima, then on those k blocks (plus the tail past the last full block).
    Only the order among exactly equal logits may differ from torch.topk's.
    """
    c, v = z.shape
    nb = v // TOPK_BLOCK
    if nb < 4 * k:  # a small vocabulary or a large k: nothing to gain
        return torch.topk(z, k, dim=-1, sorted=True)
    head = z[:, : nb * TOPK_BLOCK].view(c, nb, TOPK_BLOCK)  # (C, nb, B)
    blocks = torch.topk(head.amax(dim=-1), k, dim=-1, sorted=False).indices  # (C, k)
    rows = torch.arange(c, device=z.device)[:, None]
    cand = head[rows, blocks].view(c, k * TOPK_BLOCK)  # (C, k*B) their logits
    cols = (blocks[..., None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=z.device)).view(c, -1)
    if nb * TOPK_BLOCK < v:  # the tail past the last full block is always a candidate
        cand = torch.cat([cand, z[:, nb * TOPK_BLOCK:]], dim=1)
        cols = torch.cat([cols, torch.arange(nb * TOPK_BLOCK, v, device=z.device).expand(c, -1)], dim=1)
    vals, j = torch.topk(cand, k, dim=-1, sorted=True)  # (C, k)
    return vals, cols.gather(1, j)


def reduce_logits(z: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Top-k of a (C, V) float32 logit chunk, and log sum exp(z/T) for each T (ascending).

    One exp serves every temperature: with e = exp((z - max) / T_max), exp((z - max) / T) is
    e ** (T_max / T), computed in place going down the grid (a square when T halves). Starting
    from the highest T, a term that underflows is negligible at every lower T too; starting from
    the lowest would drop logits more than ~87 * T_min below the max, which still hold mass at
    the highest T. `z` is overwritten.
    """
    vals, idx = topk(z, k)  # (C, k)
    m = vals[:, :1]  # (C, 1) the max logit
    z.sub_(m)
    t_max = temperatures[-1]
    if t_max != 1.0:
        z.div_(t_max)
    z.exp_()
    log_z = []
    prev = t_max
    for t in reversed(temperatures):
        r = prev / t  # >= 1
        if r == 2.0:
            z.square_()
        elif r == 4.0:
            z.square_().square_()
        elif r != 1.0:
            z.pow_(r)
        prev = t
        log_z.append(m[:, 0] / t + torch.log(z.sum(-1)))
    return idx, vals, torch.stack(log_z[::-1], dim=-1)


class TeacherRunner:
    """Runs the teacher on padded batches and returns per-position cache rows for one target mode."""

    def __init__(self, model: nn.Module, top_k: int, temperatures: tuple[float, ...],
                 projection: torch.Tensor, device: torch.device, chunk: int | None = None,
                 mode: str = "topk", precision: str = "fp32", layers: tuple[int, ...] = (),
                 layer_projections: torch.Tensor | None = None, compile_spec: Compile | None = None,
                 relation_layer: int | None = None, relation_parts: str = "") -> None:
        """layers: other hidden_states indices stored beside the last (pipeline/layer_targets.py),
        each through its (H, d) slice of layer_projections (n, H, d). relation_layer: the teacher
        layer (1..N) whose attention projections `relation_parts` are stored too (relation_targets.py)."""
        from kdpipe.pipeline.modes import get_mode  # the modes' reductions import this module
        from kdpipe.pipeline.relation_targets import LayerParts

        self.model = model.to(device)
        # the forward pass up to the decoder input, compiled where asked (the decoder is always
        # bypassed when it runs, so its guards never change); check_head_split's reference is eager
        self.forward = compiled(self.model, compile_spec)
        self.device = device
        self.precision = precision  # of the teacher's forward pass; the reductions stay float32
        self.mode = get_mode(mode)
        self.k = top_k
        self.temperatures = tuple(sorted(temperatures))
        self.projection = projection.to(device=device, dtype=torch.float32)  # (H, d)
        self.layers = tuple(layers)
        self.layer_projections = None if not layers else \
            layer_projections.to(device=device, dtype=torch.float32)  # (n, H, d)
        # rows per decoder matmul and reduction. On CPU, the mode's cpu_chunk_rows (topk: 1024 x 30k
        # float32 = 125 MB): large ops, few of them. Cache-sized row blocks (16 rows) saved at most
        # ~10% on an idle 2-core machine, and were 4-7x slower than the bare forward pass once
        # another process competed for the cores (each small op's thread barrier waits for a
        # descheduled thread).
        self.relation_layer = relation_layer
        self.relation = None if relation_layer is None else LayerParts(model, relation_layer - 1, relation_parts)
        self.chunk = chunk or (4096 if device.type == "cuda" else self.mode.cpu_chunk_rows)
        dec = decoder_of(model)
        self.weight_t = dec.weight.detach().float().t()  # (H', V)
        self.bias = None if dec.bias is None else dec.bias.detach().float()

    @torch.inference_mode()
    def hidden_and_decoder_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) last hidden states and (N, H') decoder inputs at the non-padding positions."""
        h, x, _, _ = self._forward(input_ids, attention_mask)
        valid = attention_mask.to(self.device).bool()
        return h[valid], x[valid]

    @torch.inference_mode()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(N, H) unprojected hidden states at the non-padding positions: the last layer's, then
        those after each of `layers` (what the projections are fitted on)."""
        h, _, states, _ = self._forward(input_ids, attention_mask)
        valid = attention_mask.to(self.device).bool()
        return [s[valid] for s in (h, *states)]

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(B, T, H) last hidden states, (B, T, H') decoder inputs, the (B, T, H) states after
        each of `layers`, and the relation layer's (B, T, n * D) projections of its input (None
        without one), float32."""
        with autocast(self.device, self.precision), decoder_bypassed(self.model):
            out = self.forward(input_ids=input_ids.to(self.device),
                             attention_mask=attention_mask.to(self.device), output_hidden_states=True)
            rel = None if self.relation is None else self.relation(out.hidden_states[self.relation_layer - 1])
        return (out.hidden_states[-1].float(), out.logits.float(),
                [out.hidden_states[i].float() for i in self.layers], None if rel is None else rel.float())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full (N, V) float32 logits from decoder inputs; for checks, not the hot path."""
        z = x @ self.weight_t
        return z if self.bias is None else z + self.bias

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            target_mask: torch.Tensor | None = None, uniforms: torch.Tensor | None = None
            ) -> TeacherOutputs:
        """target_mask (B, T) bool: where targets are stored (default: every non-padding position);
        uniforms (P, N): the draws' uniforms in the sampled mode, one row per target position."""
        h, x, states, rel = self._forward(input_ids, attention_mask)  # (B, T, H), (B, T, H'), n x (B, T, H)
        valid = self._where(attention_mask)
        targets = valid if target_mask is None else self._where(target_mask)
        out = {"hidden": h.flatten(0, 1)[valid] @ self.projection}  # (N, d)
        if states:  # (N, n * d): each layer through its own projection, side by side
            out["hidden_layers"] = torch.cat([s.flatten(0, 1)[valid] @ p
                                              for s, p in zip(states, self.layer_projections)], dim=1)
        if rel is not None:  # (N, n * D)
            out["relation"] = rel.flatten(0, 1)[valid]
        x = x.flatten(0, 1)[targets]  # (P, H')
        return TeacherOutputs(**self._to_host({**out, **self.mode.reduce(self, x, uniforms)}))

    def _where(self, mask: torch.Tensor) -> torch.Tensor:
        """(n,) flat indices of a host (B, T) mask's true entries, on the device: found on the host,
        so indexing with them does not wait for the device (a boolean mask on the device would)."""
        return torch.nonzero(mask.reshape(-1).cpu().bool()).reshape(-1).to(self.device, non_blocking=True)

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Numpy arrays of device tensors. On CUDA every copy goes into page-locked memory without
        blocking, and the host waits once for all of them."""
        if self.device.type != "cuda":
            return {n: t.cpu().numpy() for n, t in tensors.items()}
        host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in tensors.items()}
        for n, t in tensors.items():
            host[n].copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return {n: t.numpy() for n, t in host.items()}

    def logit_chunks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, (C, V) float32 logits) of each chunk of `self.chunk` decoder inputs; the
        logits live in one buffer, overwritten by the next chunk."""
        for i in range(0, x.shape[0], self.chunk):
            yield i, self._logits_into_buffer(x[i:i + self.chunk])  # (C, V)

    def _logits_into_buffer(self, xc: torch.Tensor) -> torch.Tensor:
        """The chunk's (C, V) logits, written into one buffer reused from chunk to chunk: a fresh
        125 MB tensor per chunk costs page faults and zeroing on every chunk (what the bare forward
        pass pays for its (B, T, V) logits)."""
        if getattr(self, "_buffer", None) is None or self._buffer.shape[0] < xc.shape[0]:
            self._buffer = torch.empty(max(self.chunk, xc.shape[0]), self.weight_t.shape[1],
                                       device=self.device, dtype=torch.float32)
        out = self._buffer[: xc.shape[0]]
        if self.bias is None:
            return torch.mm(xc, self.weight_t, out=out)
        return torch.addmm(self.bias, xc, self.weight_t, out=out)

    @torch.inference_mode()
    def check_head_split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
        """Max |difference| between the model's own logits and the split head's; refuses a head
        that does more after its decoder than kdpipe reproduces."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with autocast(self.device, self.precision):
            ref = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        ref = ref[attention_mask.bool()].float()
        _, x = self.hidden_and_decoder_input(input_ids, attention_mask)
        diff = (self.logits(x) - ref).abs().max().item()
        loose = self.device.type == "cuda" or self.precision != "fp32"  # TF32 or autocast
        tol = 1e-3 * max(1.0, ref.abs().max().item()) * (30 if loose else 1)
        if not diff <= tol:
            raise KdpipeError(f"teacher's masked-LM head is not a plain linear decoder "
                              f"(split-head logits differ by {diff:.3g}); unsupported model")
        return diff
