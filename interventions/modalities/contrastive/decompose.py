"""Text-span decomposition of a CLIP image embedding (Gandelsman, Efros and Steinhardt, ICLR 2024).

**Direct contributions.** A pre-norm ViT's CLS state after the last layer is a sum: its input embedding
plus, per layer, the attention output and the MLP output at CLS. The attention output at CLS is itself
a sum over heads h and positions p of ``A_h[CLS, p] · W_O,h (W_V,h LN1(x)_p + b_V,h)``, plus the output
bias. The post-norm is linear once its scale σ (the CLS state's standard deviation in the forward being
decomposed) is held fixed: ``LN(z) = γ ⊙ (z − mean z) / σ + β``. So the (unnormalised) image embedding
``P · LN(x_L[CLS])`` is exactly

    Σ_{l,h,p} P(γ ⊙ centre(head term)) / σ  +  Σ_l P(γ ⊙ centre(MLP_l)) / σ  +  the same for the input
    embedding and each layer's output bias  +  P β

and `contributions` returns each term (tested: the sum equals `CLIPModel.get_image_features` to 1e-5).

**Mean ablation.** Replacing a set of terms by their mean over the images keeps the rest of the sum:
``e' = e − Σ (c − mean c)``. The paper's check, that the direct effects of all but the last few layers
can be mean-ablated at little cost, is `layer_ablation`; one head's score is the accuracy lost when it
alone is mean-ablated (`head_ablation`).

**TextSpan.** For one head, C (images × dims) holds its direct contributions (summed over positions)
centred over the images. Text directions (normalised text embeddings of a bank of descriptions) are first
projected onto C's top principal components; then, greedily, the text whose direction explains the most
of C's remaining variance is chosen, and its direction is projected out of C and of every text
(`text_span`). Each chosen text's share is the variance it removed over C's total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Contributions:
    """Direct contributions to the unnormalised image embeddings of n images (projection dims p)."""

    heads: torch.Tensor        # (n, layers, heads, positions, p): attention heads, per source position
    mlps: torch.Tensor         # (n, layers, p)
    rest: torch.Tensor         # (n, p): the input embedding, every output bias, and P·β
    embeddings: torch.Tensor   # (n, p): the model's own image embeddings (unnormalised)

    def total(self) -> torch.Tensor:
        return self.heads.sum((1, 2, 3)) + self.mlps.sum(1) + self.rest

    @property
    def per_head(self) -> torch.Tensor:
        """(n, layers, heads, p): each head's contribution summed over positions."""
        return self.heads.sum(3)


def _heads_at_cls(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per head and position (n, heads, positions, d), output bias (d,))``: the attention output at CLS of
    `attn` (a CLIP attention module) on its normed input `x` (n, positions, d), split into its terms."""
    n, t, d = x.shape
    h, k = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(n, 1, h, k).transpose(1, 2)
    keys = attn.k_proj(x).view(n, t, h, k).transpose(1, 2)
    values = attn.v_proj(x).view(n, t, h, k).transpose(1, 2)                  # (n, h, t, k)
    weights = ((q @ keys.transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0]   # (n, h, t)
    w_out = attn.out_proj.weight.view(d, h, k)                                # d_out, head, k
    terms = torch.einsum("nht,nhtk,dhk->nhtd", weights, values, w_out)
    return terms, attn.out_proj.bias


@torch.no_grad()
def contributions(clip, pixels: torch.Tensor) -> Contributions:
    """Every direct contribution to the image embeddings of ``pixels (n, 3, H, W)`` (see the module)."""
    vision = clip.vision_model
    captured: dict = {}
    hooks = []
    for i, layer in enumerate(vision.encoder.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: captured.__setitem__(("ln1", i), kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(("mlp", i), out[:, 0])))
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(("attn", i), out[0][:, 0])))
    hooks.append(vision.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: captured.__setitem__("x0", kwargs["inputs_embeds"][:, 0]), with_kwargs=True))
    try:
        out = vision(pixel_values=pixels.to(clip.logit_scale.device))
    finally:
        for h in hooks:
            h.remove()
    final = out.last_hidden_state[:, 0]
    norm = vision.post_layernorm
    sigma = (final.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()        # (n, 1)
    proj = clip.visual_projection.weight                                            # (p, d)

    def through(c: torch.Tensor) -> torch.Tensor:          # c (..., d) for n images first -> (..., p)
        centred = c - c.mean(-1, keepdim=True)
        s = sigma.view(sigma.shape[0], *([1] * (c.dim() - 2)), 1)
        return (norm.weight * centred / s) @ proj.T

    heads, biases = [], []
    for i, layer in enumerate(vision.encoder.layers):
        terms, bias = _heads_at_cls(layer.self_attn, captured[("ln1", i)])
        heads.append(through(terms))
        biases.append(bias)
    rest = through(captured["x0"] + torch.stack(biases).sum(0)) + norm.bias @ proj.T
    mlps = torch.stack([through(captured[("mlp", i)]) for i in range(len(vision.encoder.layers))], 1)
    return Contributions(torch.stack(heads, 1), mlps, rest, clip.visual_projection(out.pooler_output))


def accuracy(embeddings: torch.Tensor, classes: torch.Tensor, truth: torch.Tensor) -> float:
    """Zero-shot accuracy of unnormalised image `embeddings` against normalised class rows."""
    return float(((embeddings @ classes.T).argmax(-1) == truth).float().mean())


def mean_ablated(c: Contributions, heads: list[tuple[int, int]] = (), layers: range = range(0), mlps: bool = True):
    """The embeddings with the named heads (layer, head), and every head (and MLP, with `mlps`) of `layers`,
    replaced by their mean over the images."""
    e = c.embeddings.clone()
    per_head = c.per_head
    chosen = set(heads) | {(l, h) for l in layers for h in range(per_head.shape[2])}
    for l, h in chosen:
        e -= per_head[:, l, h] - per_head[:, l, h].mean(0)
    if mlps:
        for l in layers:
            e -= c.mlps[:, l] - c.mlps[:, l].mean(0)
    return e


def layer_ablation(c: Contributions, classes: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Accuracy with the direct effects (heads and MLPs) of layers 0..L−1 mean-ablated, for L = 0..layers."""
    return [accuracy(mean_ablated(c, layers=range(L)), classes, truth) for L in range(c.heads.shape[1] + 1)]


def head_ablation(c: Contributions, classes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(layers, heads): accuracy with that head alone mean-ablated."""
    layers, heads = c.heads.shape[1:3]
    return torch.tensor([[accuracy(mean_ablated(c, [(l, h)]), classes, truth) for h in range(heads)]
                         for l in range(layers)])


@dataclass
class Span:
    texts: list[int]          # indices into the text bank, in the order chosen
    shares: list[float]       # the share of the head's variance each removed
    variance: float           # the head's total variance (sum over dims, centred over images)


def text_span(C: torch.Tensor, texts: torch.Tensor, m: int, components: int) -> Span:
    """TextSpan for one head: `C` (n, p) its contributions, `texts` (M, p) normalised text embeddings; `m` texts
    chosen after projecting the texts onto C's top `components` principal directions."""
    C = (C - C.mean(0)).double()
    total = float((C ** 2).sum())
    _, _, vt = torch.linalg.svd(C, full_matrices=False)
    basis = vt[:components]                                             # (r, p)
    T = (texts.double() @ basis.T) @ basis                              # texts in C's principal span
    chosen, shares = [], []
    for _ in range(m):
        norms = T.norm(dim=1).clamp_min(1e-12)
        scores = ((C @ (T / norms[:, None]).T) ** 2).sum(0)            # variance along each text
        if chosen:
            scores[chosen] = -1.0
        j = int(scores.argmax())
        t = T[j] / norms[j]
        before = float((C ** 2).sum())
        C = C - (C @ t)[:, None] * t
        T = T - (T @ t)[:, None] * t
        chosen.append(j)
        shares.append((before - float((C ** 2).sum())) / total if total > 0 else 0.0)
    return Span(chosen, shares, total)
