"""Peak memory of a LoRA / QLoRA training run, predicted from the model's config alone.

Pure Python (no torch): the API process and preflight use it before any weights load.
It models what `worker_gpu.recipe_lora` really does, term by term:

- base weights: every parameter in the compute dtype (LoRA); for QLoRA the linear layers
  of the blocks in NF4 with double-quantized absmax, and everything else (embeddings,
  norms, lm_head, kept out by `llm_int8_skip_modules`) upcast to float32 by
  `prepare_model_for_kbit_training`;
- the adapter: LoRA A and B on each targeted linear layer, in float32 (PEFT keeps
  adapters in float32 on a half-precision base), its gradients (kept across the
  micro-batches of a step) and AdamW's two moments;
- activations saved for backward, per decoder layer, from the tensors autograd actually
  keeps (see `_layer_saved_bytes`); with gradient checkpointing only each layer's input
  is kept and one layer at a time is recomputed during backward;
- the logits and loss: `summed_loss` takes the logits in the compute dtype, copies them
  to float32 and runs cross-entropy on them, so at the end of the forward pass (and at
  the start of backward) three logits-sized float32 tensors are alive at once;
- the eval pass, which runs after the step (activations and gradients freed) on a batch
  of the same size, without autograd.

A padded micro-batch of several rows (`collate` pads rows to the longest) gives attention
an explicit mask, which SDPA converts to the compute dtype and keeps per layer, and
grouped-query keys and values are repeated to every head before attention; a padded
micro-batch of one row needs neither. Padding-free batching (`worker_gpu/packing.py`)
always has a mask, the block-diagonal one transformers builds from position_ids, even for
one row. Its micro-batch is at most micro_batch rows of seq_len tokens, every slot a real
token but the tail of the shortest rows: so activations are counted by tokens, and the
peak's micro_batch x seq_len tokens are the same for both (a padded micro-batch peaks
when its longest row is seq_len; a packed one when the step's tokens fill its rows).

Checked against measured peaks on CPU by `benchmarks/memory_estimate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.model_matrix import ModelEntry

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("lora", "qlora")
DEVICES = ("cpu", "cuda")
BATCHINGS = ("padded", "padding_free")

# NF4: 4 bits per weight, plus one absmax per 64-weight block, itself quantized to 8 bits
# (double quantization) with one float32 absmax per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
LORA_PARAM_BYTES = 4  # adapters are float32, so are their gradients and AdamW moments
NORM_SAVED_BYTES = 4  # RMSNorm upcasts its input to float32 and keeps that copy for backward
LOGSUMEXP_BYTES = 4  # SDPA keeps a float32 logsumexp per head and token

# What training may use of the memory a worker reports: headroom for the CUDA context and
# fragmentation on a GPU; on CPU, room for the OS, the worker process and the page cache.
# Preflight plans with it and GET /v1/models judges fit with it, so the two agree.
USABLE_GPU = 0.90
USABLE_RAM = 0.80

# What a process holds before any model loads. CPU: resident memory of a Python process
# with torch, transformers, peft and bitsandbytes imported and one micro training step run
# (code paged in, thread pools): 718-723 MiB measured by benchmarks/memory_estimate.py on
# Linux x86-64 with torch 2.11, which prints it. CUDA: GPU memory taken by the CUDA
# context, kernel images and the cuBLAS workspace, typically 0.5-1 GiB; not measured
# here, 1 GiB assumed.
FRAMEWORK_OVERHEAD_BYTES = {"cpu": 720 * 2**20, "cuda": 2**30}

# The linear layers of a Llama / Qwen2 / Mistral decoder block, and what "all-linear"
# means for PEFT (every linear layer but the output head).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules fed by the same tensor: in float32 without dropout they save one shared input.
_INPUT_GROUP = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
    "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid",
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only model."""

    num_parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // max(1, self.num_heads))

    @classmethod
    def from_config(cls, config: dict, num_parameters: int) -> ModelShape:
        """Read a Hugging Face config.json dict (a multimodal one's text_config too)."""
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], **{k: v for k, v in config.items() if k == "tie_word_embeddings"}}

        def first(*keys, default=None):
            for key in keys:
                if config.get(key) is not None:
                    return config[key]
            if default is None:
                raise ValueError(
                    f"config.json has none of {', '.join(keys)}; the memory estimate needs it "
                    "(is this a decoder-only causal LM config?)"
                )
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        return cls(
            num_parameters=int(num_parameters),
            hidden_size=hidden,
            num_layers=int(first("num_hidden_layers", "n_layer")),
            num_heads=heads,
            num_kv_heads=int(first("num_key_value_heads", default=heads)),
            intermediate_size=int(first("intermediate_size", "n_inner", default=4 * hidden)),
            vocab_size=int(first("vocab_size")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config.get("head_dim") or 0),
        )

    @classmethod
    def from_matrix_entry(cls, entry: ModelEntry) -> ModelShape:
        """A model-matrix entry's shape (schemas/model_matrix.yaml): estimates before any weights exist."""
        return cls(
            num_parameters=entry.parameters,
            hidden_size=entry.hidden_size,
            num_layers=entry.num_layers,
            num_heads=entry.num_heads,
            num_kv_heads=entry.num_kv_heads,
            intermediate_size=entry.intermediate_size,
            vocab_size=entry.vocab_size,
            tie_word_embeddings=entry.tie_word_embeddings,
            head_dim=entry.attention_head_dim,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def block_linear_parameters(self) -> int:
        """Weights of the linear layers in all decoder blocks (what QLoRA quantizes)."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term and the predicted peak. Terms that never coexist are not summed:
    `total` is the framework overhead plus the largest of the phases (end of forward,
    backward through a recomputed layer, eval pass)."""

    weights: int
    lora_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    eval_pass: int
    framework_overhead: int
    total: int
    # Context for the report.
    method: str = "lora"
    dtype: str = "float32"
    device: str = "cpu"
    seq_len: int = 0
    micro_batch: int = 0
    gradient_checkpointing: bool = False
    lora_parameters: int = 0
    quantized_parameters: int = 0
    target_modules: tuple[str, ...] = ()
    peak_phase: str = "end of forward"

    @property
    def training_bytes(self) -> int:
        """The peak without the framework overhead: what a model and a run add."""
        return self.total - self.framework_overhead

    def lines(self) -> list[str]:
        """One sentence per term, with sizes, for the preflight report."""
        tokens = f"{self.micro_batch} x {self.seq_len} tokens"
        if self.method == "qlora":
            weights = (
                f"{self.quantized_parameters:,} block linear weights in 4-bit NF4 with double-quantized scales; "
                "embeddings, norms and lm_head in float32"
            )
        else:
            weights = f"every parameter in {self.dtype}"
        if self.gradient_checkpointing:
            kept = "with gradient checkpointing: each layer's input, and one layer at a time recomputed in backward"
        else:
            kept = "without gradient checkpointing: every layer keeps what its backward needs"
        overhead = (
            "the CUDA context, kernels and cuBLAS workspace"
            if self.device == "cuda"
            else "the process with torch, transformers, peft and bitsandbytes loaded"
        )
        lora = f"{self.lora_parameters:,} float32 parameters: A and B of each {', '.join(self.target_modules)}"
        logits = (
            f"{tokens} x vocabulary: the logits in {self.dtype}, their float32 copy and the float32 "
            "log-softmax of cross-entropy, alive together at the end of the forward pass"
        )
        eval_pass = "the same batch without autograd, after the step's activations and gradients are freed"
        return [
            f"base weights: {_size(self.weights)} ({weights})",
            f"LoRA weights: {_size(self.lora_weights)} ({lora})",
            f"gradients: {_size(self.gradients)} (float32, one per LoRA parameter, kept across a step's micro-batches)",
            f"optimizer state: {_size(self.optimizer_state)} (AdamW's two float32 moments per LoRA parameter)",
            f"activations: {_size(self.activations)} (saved for backward, {tokens} in {self.dtype}, {kept})",
            f"logits and loss: {_size(self.logits)} ({logits})",
            f"eval pass: {_size(self.eval_pass)} ({eval_pass})",
            f"framework overhead: {_size(self.framework_overhead)} ({overhead})",
            f"predicted peak: {_size(self.total)} (at the {self.peak_phase}; terms that never coexist are not added up)",
        ]



@dataclass(frozen=True)
class UsableMemory:
    """What a training run may use on a worker, by the one rule preflight and the API share."""

    device: str  # where the tensors live: "cuda" or "cpu"
    what: str  # in words: "GPU memory", "RAM", or "memory" when it is unknown
    bytes: int | None  # None: the worker did not report its free memory


def usable_memory(hardware: HardwareInfo | None) -> UsableMemory:
    """Most of the GPU on a CUDA worker, most of MemAvailable otherwise; unknown stays unknown
    (None), for the caller to say so rather than guess silently."""
    if hardware is not None and hardware.device == "cuda" and hardware.gpu_memory_bytes:
        return UsableMemory("cuda", "GPU memory", int(hardware.gpu_memory_bytes * USABLE_GPU))
    if hardware is None or hardware.memory_available_bytes is None:
        return UsableMemory("cpu", "memory", None)
    return UsableMemory("cpu", "RAM", int(hardware.memory_available_bytes * USABLE_RAM))


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _targets(target_modules: list[str] | str) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return ALL_LINEAR
    if isinstance(target_modules, str):
        return (target_modules,)
    return tuple(dict.fromkeys(target_modules))


def _module_shape(shape: ModelShape, name: str) -> tuple[int, int]:
    shapes = shape.linear_shapes()
    if name in shapes:
        return shapes[name]
    if name == "lm_head":
        return shape.hidden_size, shape.vocab_size
    # An architecture whose layer names this estimate does not know: assume a square layer.
    return shape.hidden_size, shape.hidden_size


def estimate_training_memory(
    shape: ModelShape,
    *,
    method: str,
    lora_r: int,
    target_modules: list[str] | str = "all-linear",
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    lora_dropout: float = 0.05,
    batching: str = "padded",
) -> MemoryEstimate:
    """Predict the peak memory of training a LoRA adapter (and evaluating it) as
    `worker_gpu.recipe_lora.LoraRecipe` does, on batches of micro_batch x seq_len tokens
    (padded, or padding-free rows of up to seq_len tokens)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if batching not in BATCHINGS:
        raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHINGS)}")
    if seq_len < 1 or micro_batch < 1 or lora_r < 1:
        raise ValueError("seq_len, micro_batch and lora_r must be at least 1")

    targets = _targets(target_modules)
    act = DTYPE_BYTES[dtype]  # matmul outputs under autocast are in the compute dtype
    h, layers, vocab = shape.hidden_size, shape.num_layers, shape.vocab_size
    tokens = micro_batch * seq_len
    loss_tokens = micro_batch * max(1, seq_len - 1)  # logits are shifted by one before the loss

    # Base weights.
    if method == "qlora":
        quantized = min(shape.block_linear_parameters(), shape.num_parameters)
        # prepare_model_for_kbit_training upcasts every non-4-bit parameter to float32.
        weights = round(quantized * NF4_BYTES_PER_PARAM) + (shape.num_parameters - quantized) * 4
    else:
        quantized = 0
        weights = shape.num_parameters * act

    # The adapter and its training state.
    per_layer = [_module_shape(shape, m) for m in targets if m != "lm_head"]
    lora_params = layers * sum(lora_r * (i + o) for i, o in per_layer)
    if "lm_head" in targets:
        lora_params += lora_r * (h + vocab)
    lora_weights = lora_params * LORA_PARAM_BYTES
    gradients = lora_params * LORA_PARAM_BYTES
    optimizer_state = 2 * lora_params * LORA_PARAM_BYTES

    # Activations saved for backward. QLoRA's float32 embeddings make the residual stream
    # float32, and bitsandbytes casts each 4-bit layer's output back to its input's dtype.
    residual = 4 if method == "qlora" else act
    masked = micro_batch > 1 or batching == "padding_free"  # attention gets an explicit mask
    layer_saved = _layer_saved_bytes(
        shape, targets, lora_r=lora_r, micro_batch=micro_batch, seq_len=seq_len,
        act=act, residual=residual, device=device, lora_dropout=lora_dropout, dtype=dtype, masked=masked,
    )
    final_norm = tokens * (NORM_SAVED_BYTES * h + 4)
    if "lm_head" in targets:  # a LoRA on the output head keeps its input like any other
        mask_bytes = 1 if device == "cuda" else LORA_PARAM_BYTES
        final_norm += tokens * (act * h + (mask_bytes * h if lora_dropout > 0 else 0) + act * lora_r)
    # Shared by all layers: the boolean attention mask and the rotary cos/sin. Under
    # autocast, also the compute-dtype copies of float32 weights that backward needs: the
    # LoRA weights, and for QLoRA the float32 output head.
    padding_mask = micro_batch * seq_len * seq_len if masked else 0
    shared = padding_mask + 2 * tokens * shape.head_dim * residual
    if act < 4:
        shared += lora_params * act + (vocab * h * act if method == "qlora" else 0)
    # Gradients flowing through one layer in backward (residual stream, MLP intermediates).
    workspace = tokens * (2 * h * residual + 2 * shape.intermediate_size * residual)
    if gradient_checkpointing:
        # Only each layer's input is kept; backward recomputes one layer at a time.
        kept = layers * tokens * h * residual + final_norm + shared
        activations = kept + layer_saved["full"]
        at_recompute = activations + workspace
    else:
        # Without checkpointing the embeddings' output needs no grad, so layer 0 keeps less.
        activations = (layers - 1) * layer_saved["full"] + layer_saved["first"] + final_norm + shared
        kept = activations
        at_recompute = activations + workspace  # backward through the last layer

    # summed_loss: logits in the compute dtype, a float32 copy, float32 log-softmax (kept
    # for backward). At the start of backward: log-softmax, its gradient and nll's gradient.
    logits = max(
        tokens * vocab * act + 2 * loss_tokens * vocab * 4,
        3 * loss_tokens * vocab * 4,
    )
    at_end_of_forward = kept + logits

    # Eval pass (no autograd): logits, their float32 copy and log-softmax, plus the final
    # hidden states; or, inside a layer, its MLP intermediates.
    eval_logits = tokens * vocab * act + 2 * loss_tokens * vocab * 4 + tokens * h * (residual + 4)
    eval_layer = tokens * (3 * shape.intermediate_size * residual + 4 * h * 4) + padding_mask * act
    eval_pass = max(eval_logits, eval_layer)

    state = weights + lora_weights + optimizer_state
    phases = {
        "end of forward": state + gradients + at_end_of_forward,
        "backward through a layer": state + gradients + at_recompute,
        "eval pass": state + eval_pass,
    }
    peak_phase = max(phases, key=phases.get)
    overhead = FRAMEWORK_OVERHEAD_BYTES[device]
    return MemoryEstimate(
        weights=weights,
        lora_weights=lora_weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=activations,
        logits=logits,
        eval_pass=eval_pass,
        framework_overhead=overhead,
        total=overhead + phases[peak_phase],
        method=method,
        dtype=dtype,
        device=device,
        seq_len=seq_len,
        micro_batch=micro_batch,
        gradient_checkpointing=gradient_checkpointing,
        lora_parameters=lora_params,
        quantized_parameters=quantized,
        target_modules=targets,
        peak_phase=peak_phase,
    )


def _layer_saved_bytes(
    shape: ModelShape,
    targets: tuple[str, ...],
    *,
    lora_r: int,
    micro_batch: int,
    seq_len: int,
    act: int,
    residual: int,
    device: str,
    lora_dropout: float,
    dtype: str,
    masked: bool,
) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward: "full" for a layer whose input needs a
    gradient, "first" for layer 0 without checkpointing (the frozen embeddings' output
    needs none, so its input norm and the dropout masks fed by it are not kept)."""
    h, inter, heads = shape.hidden_size, shape.intermediate_size, shape.num_heads
    q_dim, kv_dim = heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    tokens = micro_batch * seq_len

    norms = 2 * (NORM_SAVED_BYTES * h + 4)  # float32 input copy and 1/rms per token
    # SDPA keeps query, key and value (keys and values repeated to every head once a
    # mask is given), its output, a logsumexp per head, and the mask converted to the
    # compute dtype.
    kv_saved = q_dim if masked else kv_dim
    attention = act * (2 * q_dim + 2 * kv_saved) + LOGSUMEXP_BYTES * heads
    attention_mask = micro_batch * seq_len * seq_len * act if masked else 0
    mlp = 3 * inter * residual  # gate output (for SiLU), SiLU output and up output (for the product)

    # Each LoRA module: PEFT casts its input to the adapter's float32; dropout keeps its
    # mask (bool on CUDA, a float32 multiplier on CPU); lora_A keeps its input in the
    # compute dtype; lora_B keeps lora_A's rank-r output.
    mask_bytes = 1 if device == "cuda" else LORA_PARAM_BYTES
    shared_input = lora_dropout == 0 and dtype == "float32"  # then q/k/v (and gate/up) save one tensor
    lora = 0
    first_layer_masks = 0
    groups_seen: set[str] = set()
    for name in targets:
        if name == "lm_head":
            continue
        n_in, _ = _module_shape(shape, name)
        group = _INPUT_GROUP.get(name, name)
        if not (shared_input and group in groups_seen):
            lora += act * n_in
        groups_seen.add(group)
        if lora_dropout > 0:
            lora += mask_bytes * n_in
            if group == "attn_in":
                first_layer_masks += mask_bytes * n_in
        lora += act * lora_r

    full = tokens * (norms + attention + mlp + lora) + attention_mask
    first = full - tokens * ((NORM_SAVED_BYTES * h + 4) + first_layer_masks)
    return {"full": full, "first": first}
