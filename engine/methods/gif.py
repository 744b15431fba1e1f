"""GIF (Zhang et al. 2023, "Expanding Small-Scale Datasets with Guided Imagination"), its GIF-SD form as the
UniDiffDA reference re-implements it (DiffDA-Eval augmentation/gif.py): SDEdit latents of a real image get a
channel-wise multiplicative noise and bias, moved by one signed-gradient step that raises a CLIP score, then
held within an L-infinity ball around the unperturbed latents and decoded.

The score, per image, from CLIP zero-shot probabilities over the class prompts:
- class-maintained informativeness: the entropy of the perturbed image's probabilities minus the source
  image's, plus the perturbed image's probability of the source's CLIP class (the class CLIP reads in the
  source image, not its label: the reference's choice);
- sample diversity: the KL divergence between the softmax of the perturbed image's CLIP features and the
  softmax of a reference point's. The reference takes the mean over the K variants of one source generated in
  one call. Deviation: here the reference point is the row's own unperturbed image, because a row is made
  alone from its seed (the engine's rule: a row is the same in any batch); the step still pushes each
  variant's features away from where SDEdit left them.

Pure torch: the actor passes the decoder and the CLIP image embedding as functions.
"""

from __future__ import annotations

from collections.abc import Callable

# The step, the bound and the prompt lists are config, with their sources (engine/config/generator.py GifSpec).


def entropy(probs):
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def gif_score(features, reference_features, source_probs, text, scale: float):
    """The summed score of a batch of perturbed images: `features` and `reference_features` are their CLIP
    image features and their reference points' (N x D, normalized), `source_probs` the source images' CLIP
    class probabilities (N x C), `text` the class prompts' normalized features (C x D)."""
    import torch.nn.functional as F

    probs = (scale * features @ text.T).softmax(-1)
    delta_entropy = entropy(probs) - entropy(source_probs)
    source_class = source_probs.argmax(-1, keepdim=True)
    kept = probs.gather(-1, source_class).squeeze(-1)
    log_p, log_q = F.log_softmax(features, -1), F.log_softmax(reference_features, -1)
    divergence = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p || q), the reference's KLDivLoss terms
    return (delta_entropy + kept + divergence).sum()


def guide_latents(
    latents,
    noise,
    bias,
    decode: Callable,
    embed: Callable,
    source_probs,
    text,
    scale: float,
    *,
    step_size: float,
    constraint: float,
):
    """GIF's perturbed latents (N x C x h x w) from SDEdit `latents`: `noise` and `bias` (N x C x 1 x 1, drawn
    per row) take one signed-gradient step of `step_size` up `gif_score`, then latents x (1 + noise) + bias
    is clipped to within `constraint` of `latents` in every element. `decode(latents)` gives images in
    [0, 1]; `embed(images)` their normalized CLIP features."""
    import torch

    latents = latents.detach()
    noise = noise.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    with torch.no_grad():
        reference = embed(decode(latents))
    score = gif_score(embed(decode(latents * (1 + noise) + bias)), reference, source_probs, text, scale)
    noise_grad, bias_grad = torch.autograd.grad(score, [noise, bias])
    with torch.no_grad():
        noise = noise + step_size * noise_grad.sign()
        bias = bias + step_size * bias_grad.sign()
        moved = latents * (1 + noise) + bias
        return torch.maximum(torch.minimum(moved, latents + constraint), latents - constraint)
