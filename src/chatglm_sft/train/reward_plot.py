"""The preference objectives' reward curves beside the loss in loss.png."""

from __future__ import annotations


def add_reward_curves(ax, history: list[dict]) -> None:
    """On a second y-axis: rewards/margins and rewards/accuracies of the training steps (and of the held-out pairs,
    if evaluated). Nothing when the run logged no rewards (SFT)."""
    curves = [
        (key, [(e["step"], e[key]) for e in history if key in e])
        for key in ("rewards/margins", "rewards/accuracies", "eval_rewards/margins", "eval_rewards/accuracies")
    ]
    curves = [(key, points) for key, points in curves if points]
    if not curves:
        return
    twin = ax.twinx()
    for (key, points), color in zip(curves, ("tab:green", "tab:red", "tab:olive", "tab:purple"), strict=False):
        steps, values = zip(*points, strict=True)
        marker = "o" if key.startswith("eval") else None
        twin.plot(steps, values, color=color, linestyle="--", marker=marker, label=key)
    twin.set_ylabel("reward margin / accuracy")
    twin.legend(loc="center right")
