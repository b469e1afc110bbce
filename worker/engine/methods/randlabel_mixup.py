"""randlabel-mixup (label-agnostic): random labels on D_f (RandLabel's targets) mixed with D_r by vanilla
mixup, squared error on softmax probabilities, plus a term keeping D_r's outputs. Labels are never read. One
epoch is one pass over D_f.

Not the paper's L-Mix. MixUnlearn's L-Mix baseline (Sec. 5.2) "extends the LAF by incorporating mixup": its
MSE on mixed samples is applied on top of LAF (Shen et al. 2024: VAE-based representation alignment of D_f
and D_r), which this method does not implement. It was called ``lmix`` until it was renamed for what it is;
``make_config("lmix")`` now refuses with a ConfigError naming ``randlabel-mixup``.

x_mix = lam * x_f + (1 - lam) * x_r, lam ~ Beta(alpha, alpha), one per batch (vanilla mixup); its target is
lam * onehot(r_f) + (1 - lam) * softmax(f_D(x_r)), with r_f a random label drawn once per forget sample and
f_D the frozen initial model (its self-generated prediction stands in for the unread D_r label).
loss = ||softmax(f(x_mix)) - target||^2 + w * ||softmax(f(x_r)) - softmax(f_D(x_r))||^2, w = retain_weight.
"""

from __future__ import annotations

from torch import nn

from worker.engine.config import RandLabelMixupConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods.randlabel import fit_random_labels
from worker.engine.spec import ModelSpec


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RandLabelMixupConfig,
    ctx: RunContext,
) -> nn.Module:
    return fit_random_labels(model, spec, forget, retain, config, ctx, mixup_alpha=config.alpha)
