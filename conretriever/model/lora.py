"""LoRA's forward with the adapter summed inside the matrix product instead of after it.

peft computes a LoRA-adapted linear layer (frozen ``W`` [out, in], adapter ``A`` [r, in] and
``B`` [out, r], scaling ``s = alpha / r``) as

1. ``y = x W^T``          the frozen layer, [tokens, out];
2. ``u = (x A^T) B^T``    the adapter's update, written out in full, [tokens, out];
3. ``y = y + u * s``      a multiply and an add, each reading and writing [tokens, out].

Steps 2 and 3 are rank-``r`` work but move ``tokens x out`` floats four times, and so do their
backward passes (the multiply's gradient is another full pass). On a CPU, where memory traffic
is what these passes cost, that was ~9% of a LoRA training step on Gemma-3-270M on 2 AMX
cores (2026-12-06; the timings: docs/training.md, "LoRA's forward is fused").

:func:`fuse_lora_forward` gives each adapted layer the same sum as ONE ``addmm``:

    y = addmm(x W^T, x A^T, (s B)^T)  =  x W^T + (x A^T)(s B)^T

The scaling is folded into the small ``B`` ([out, r]: r x out multiplies, not tokens x out),
and the GEMM accumulates its product straight into ``y`` (``beta = 1``). The backward has no
elementwise pass either: addmm hands ``y``'s gradient through unchanged, and autograd routes
``s`` into ``B``'s gradient through the small multiply. The result is peft's up to float
rounding (the same terms, summed in another order); step 1 (the frozen layer) is untouched.

Only peft's plain case is fused: one active vanilla adapter (no DoRA or other variant, no LoRA
bias), adapters enabled and not merged, an ``nn.Linear`` base layer, no extra forward
arguments (peft's per-row ``adapter_names``), and the input, layer and adapter in one dtype or
autocast on (where peft's path computes in the autocast dtype too). Every other case, checked on
each call, runs peft's own forward, so merging, disabling adapters or switching them all keep
peft's behaviour. Dropout on the adapter's input is drawn as peft draws it (same call order).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` inside ``model`` the fused forward (see the module
    docstring); returns how many layers got it. The parameters, their names and the saved
    state are unchanged: only the layer's ``forward`` is replaced, on the instance."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (quantised bases) keep their own forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``self`` is a peft LoRA ``Linear``; peft's forward for anything but the plain case."""
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    result = self.base_layer(x)
    low = lora_a(self.lora_dropout[name](x))  # [..., r]
    scaled_b = lora_b.weight * self.scaling[name]  # [out, r]
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), scaled_b.t()
    )
    return out.view(result.shape)


def _plain_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter's name where the fused sum is peft's computation, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    base = layer.base_layer
    if not isinstance(base, nn.Linear):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return name
    dtypes = {x.dtype, base.weight.dtype, layer.lora_A[name].weight.dtype}
    dtypes.add(layer.lora_B[name].weight.dtype)
    return name if len(dtypes) == 1 else None
