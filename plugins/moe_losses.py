"""Loss terms for mixture-of-experts students.

`moe_balance`: the Switch / GShard load-balancing loss on every MoE block's routing, plus an
optional router z-loss (ST-MoE). It reads `@router_logits` and `@router_gates` (the
`router_logits` pass, brought in by the read), so it works for upcycled students and for
Hugging Face MoE models whose blocks `moe_routing` swapped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compressor.api import LossInputs, LossTerm, hookimpl

# the taps the router_logits pass provides: every MoE router's logits and top-k gates, stacked
# [blocks, tokens, experts]
ROUTER_LOGITS, ROUTER_GATES = "@router_logits", "@router_gates"


class BalanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    z_loss: float = Field(
        0.0, ge=0, description="times the mean squared log-sum-exp of the router logits"
    )


class MoEBalance(LossTerm[BalanceOptions]):
    """Load balancing over experts: E * sum_e f_e * P_e per MoE block (1 when balanced),
    averaged over blocks; f_e is the share of routing slots sent to expert e and P_e its mean
    router probability, over the batch's real tokens."""

    name = "moe_balance"
    needs_teacher = False
    default_weight = 0.01

    def reads(self) -> dict[str, list[str]]:
        return {"student": [ROUTER_LOGITS, ROUTER_GATES], "teacher": []}

    def units(self, batch: Any, target: torch.Tensor | None) -> torch.Tensor:
        mask = _token_mask(batch)
        return super().units(batch, target) if mask is None else mask.sum().float()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        logits = inputs.student[ROUTER_LOGITS].float()  # [L, N, E]
        sent = (inputs.student[ROUTER_GATES] > 0).float()
        mask = _token_mask(inputs.batch)
        if mask is not None and mask.numel() == logits.shape[1]:
            keep = mask.reshape(-1).bool()
            logits, sent = logits[:, keep], sent[:, keep]
        self._last_slots = sent.sum(1).detach()  # [L, E] routing slots per expert
        experts = logits.shape[-1]
        share = sent.mean(1) / sent.sum(-1).mean(1, keepdim=True).clamp(min=1)  # f_e [L, E]
        probability = F.softmax(logits, dim=-1).mean(1)  # P_e [L, E]
        loss = (experts * (share * probability).sum(-1)).mean()
        if self.options.z_loss:
            loss = loss + self.options.z_loss * torch.logsumexp(logits, -1).square().mean()
        return loss

    def observed(self) -> dict[str, float]:
        """Each expert's share of the routing slots on the last batch, averaged over the MoE
        blocks (1/E each when balanced), and the largest share in any block."""
        slots = getattr(self, "_last_slots", None)
        if slots is None:
            return {}
        load = (slots / slots.sum(-1, keepdim=True).clamp(min=1)).cpu()  # [L, E]
        shares = {f"load_expert_{e}": float(v) for e, v in enumerate(load.mean(0))}
        return {**shares, "load_max": float(load.max())}


def _token_mask(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, dict) else None


@hookimpl
def compressor_losses() -> list[type]:
    return [MoEBalance]
