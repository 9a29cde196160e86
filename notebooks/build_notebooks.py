"""Writes and executes the notebooks (python notebooks/build_notebooks.py [--workdir=RUN]).

Each notebook re-runs on CPU in about a minute: it reads a finished demo run's metrics and
recomputes the library's key numbers (CLIPO analytic cases, rubric aggregation) in place.
"""

import argparse
import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def demo_notebook(workdir: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    c = nb.cells
    c.append(
        nbformat.v4.new_markdown_cell(
            "# The embedded demo: SFT + GRPO on the synthetic arithmetic task\n"
            "Reads a run made by `python -m experiments.train --config=configs/demo.py --workdir=WORKDIR` and "
            "shows the reward curve and the before/after evaluation (outcome, process, lucky rate)."
        )
    )
    c.append(
        nbformat.v4.new_code_cell(
            f"import json, os\nWORKDIR = os.environ.get('CLIPO_DEMO_WORKDIR', {workdir!r})\n"
            "rows = [json.loads(l) for l in open(os.path.join(WORKDIR, 'metrics.jsonl'))]\n"
            "steps = [r['step'] for r in rows]\nreward = [r['reward/outcome_mean'] for r in rows]\n"
            "print(len(rows), 'RL steps; first/last 5-step mean reward:',\n"
            "      round(sum(reward[:5]) / 5, 3), round(sum(reward[-5:]) / 5, 3))"
        )
    )
    c.append(
        nbformat.v4.new_code_cell(
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "import numpy as np\nk = 5\nsmooth = np.convolve(reward, np.ones(k) / k, mode='valid')\n"
            "fig, ax = plt.subplots(figsize=(6, 3))\nax.plot(steps, reward, alpha=0.3, label='per step')\n"
            "ax.plot(steps[k - 1:], smooth, label=f'{k}-step mean')\nax.set_xlabel('RL step'); ax.set_ylabel('outcome reward')\n"
            "ax.legend(); fig.tight_layout(); png = os.path.join(WORKDIR, 'reward_curve.png'); fig.savefig(png)\n"
            "from IPython.display import Image\nImage(filename=png)"
        )
    )
    c.append(
        nbformat.v4.new_code_cell(
            "before = json.load(open(os.path.join(WORKDIR, 'eval_before.json')))\n"
            "after = json.load(open(os.path.join(WORKDIR, 'eval_after.json')))\n"
            "print(f\"{'test set':<14}{'outcome':>16}{'process':>16}{'lucky':>16}\")\n"
            "for name in after:\n"
            "    b, a = before[name], after[name]\n"
            "    print(f\"{name:<14}\" + ''.join(f\"{b[k]:>8.3f}->{a[k]:<7.3f}\" for k in ('outcome', 'process', 'lucky')))"
        )
    )
    c.append(
        nbformat.v4.new_markdown_cell(
            "## CLIPO's two analytic cases (CLIPO paper, arXiv 2603.10101: the supervised contrastive loss), recomputed\n"
            "A group of 16: 8 correct responses sharing one embedding, 8 incorrect orthogonal ones: InfoNCE = log 7 "
            "for every correct anchor. All others orthogonal to the anchor: about 2.988 (not log 15)."
        )
    )
    c.append(
        nbformat.v4.new_code_cell(
            "import jax, jax.numpy as jnp\nfrom clipo_jax import contrastive\n"
            "e = np.zeros((16, 16), np.float32); e[:8, 0] = 1.0\nfor i in range(8, 16): e[i, i] = 1.0\n"
            "labels = np.array([1] * 8 + [0] * 8); groups = np.zeros(16, np.int32)\n"
            "per, loss = contrastive.contrastive_loss(jnp.asarray(e), jnp.asarray(labels), jnp.asarray(groups), rng=jax.random.key(0))\n"
            "print('correct anchors:', np.asarray(per[:8]).round(4), ' log 7 =', round(float(np.log(7)), 4))"
        )
    )
    return nb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/clipo_demo")
    args = p.parse_args()
    nb = demo_notebook(args.workdir)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(HERE)}}
    ).execute()
    out = os.path.join(HERE, "demo_results.ipynb")
    nbformat.write(nb, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
