"""The taps the `fused_head` pass provides: a language model's head input (`@head_hidden`,
[..., H]), weight (`@head_weight`, [V, H]) and bias (`@head_bias`, [V], when the head has
one). `kd` with `fused_head: true` reads them; the pass (`compressor.passes.fused_head`)
and the loss both take the names from here."""

HIDDEN, WEIGHT, BIAS = "@head_hidden", "@head_weight", "@head_bias"
