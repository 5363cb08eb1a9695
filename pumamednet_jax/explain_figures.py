"""The figures and the page of `explain`: strips of frames, the relevance
map, and index.html (a self-contained explorer with the frames inlined)."""

import base64
import html
import io
import json

import numpy as np
from matplotlib import figure
from PIL import Image

PANEL_INCHES = 1.05


def edit_figure(path: str, inputs, frames: np.ndarray, probabilities,
                column_labels, title: str, row_labels=None) -> None:
  """Rows of frames (R, A, S, S) in [0, 1], the probability under each; a
  first column with the input when `inputs` (R, S, S) is given."""
  rows, steps = frames.shape[:2]
  columns = steps + (inputs is not None)
  fig = figure.Figure(figsize=(PANEL_INCHES * columns + 0.6,
                               PANEL_INCHES * 1.25 * rows + 0.5), dpi=100,
                      layout='constrained')
  axes = np.asarray(fig.subplots(rows, columns, squeeze=False))
  for r in range(rows):
    panels = [(frames[r, a], f'{probabilities[r, a]:.2f}')
              for a in range(steps)]
    if inputs is not None:
      panels.insert(0, (inputs[r], 'input'))
    for c, (picture, caption) in enumerate(panels):
      ax = axes[r, c]
      ax.imshow(picture, cmap='gray', vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlabel(caption, fontsize=8, labelpad=1)
      if r == 0:
        labels = (['input'] if inputs is not None else []) + list(column_labels)
        ax.set_title(labels[c], fontsize=8)
    if row_labels is not None:
      axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path)


def relevance_figure(path: str, names, relevance: np.ndarray,
                     method: str) -> None:
  """Heads × latents, each row scaled to its largest score; the 5 most
  relevant latents of each head marked."""
  scaled = relevance / np.maximum(relevance.max(axis=1, keepdims=True), 1e-12)
  fig = figure.Figure(figsize=(min(4 + 0.12 * relevance.shape[1], 16),
                               1.5 + 0.28 * len(names)), dpi=100,
                      layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(scaled, aspect='auto', cmap='viridis', vmin=0, vmax=1,
                    interpolation='nearest')
  for k in range(len(names)):
    top = np.argsort(-relevance[k])[:5]
    ax.scatter(top, np.full(len(top), k), s=6, c='red', marker='o')
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel('latent')
  ax.set_title(f'relevance ({method}), each head scaled to its maximum; red: '
               'top 5', fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.02)
  fig.savefig(path)


def _png_base64(image: np.ndarray) -> str:
  """(H, W) in [0, 1] or uint8 → a PNG as base64 text."""
  if image.dtype != np.uint8:
    image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', optimize=True)
  return base64.b64encode(buffer.getvalue()).decode('ascii')


def page_data(images, reconstructions, edits, names, num_images) -> dict:
  """The page's data: per image its input and reconstruction, and per edit
  a strip of frames side by side (one PNG) with every head's score per
  frame."""
  data = {'heads': list(names), 'images': [], 'edits': []}
  for i in range(num_images):
    data['images'].append({'input': _png_base64(images[i]),
                           'reconstruction': _png_base64(reconstructions[i])})
  for kind, name, steps, frames, scores in edits:
    data['edits'].append({
        'kind': kind, 'name': name, 'steps': [float(s) for s in steps],
        'strips': [_png_base64(np.concatenate(list(frames[i]), axis=1))
                   for i in range(num_images)],
        'scores': np.round(scores[:num_images], 4).tolist()})
  return data


def write_page(path: str, images, reconstructions, edits, names,
               num_images: int, result: dict) -> None:
  """index.html: everything inlined, no network."""
  data = page_data(images, reconstructions, edits, names, num_images)
  summary = _summary_table(result)
  page = PAGE.replace('%SUMMARY%', summary).replace(
      '%DATA%', json.dumps(data).replace('</', '<\\/'))
  with open(path, 'w', encoding='utf-8') as file:
    file.write(page)


def _summary_table(result: dict) -> str:
  rows = ''.join(
      f'<tr><td>{html.escape(a)}</td><td>{v["rho_model"]:.2f}</td>'
      f'<td>{v["rho_judge"]:.2f}</td><td>{v["specificity"]:.2f}</td></tr>'
      for a, v in result['interpolation'].items())
  return ('<table id="faithfulness"><tr><th>attribute</th><th>ρ model</th>'
          f'<th>ρ judge</th><th>specificity</th></tr>{rows}</table>')


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>PumaMedNet latent explorer</title>
<style>
body { font-family: sans-serif; margin: 16px; color: #222; }
#controls label { margin-right: 14px; }
#view { display: flex; gap: 24px; align-items: flex-start; margin-top: 12px; }
canvas, .thumb { image-rendering: auto; background: #000; }
#scores { border-collapse: collapse; font-size: 13px; }
#scores td { padding: 1px 6px; }
.bar { background: #4a7fb5; height: 10px; }
.barbox { width: 160px; background: #eee; }
#faithfulness td, #faithfulness th { padding: 2px 8px; font-size: 13px; }
</style></head>
<body>
<h1>Latent explorer</h1>
<p>Pick an image and an edit (an attribute: z + α(z̄₁ − z̄₀); a latent:
set to mean + t·sd), then drag the slider. The scores are the model's, of the
frame shown encoded again.</p>
<div id="controls">
<label>image <select id="image"></select></label>
<label>edit <select id="edit"></select></label>
<label>step <input id="slider" type="range" min="0" max="0" value="0"></label>
<span id="step"></span>
</div>
<div id="view">
<div><div>input | reconstruction</div>
<img id="input" class="thumb" width="192" height="192" alt="input">
<img id="reconstruction" class="thumb" width="192" height="192" alt="reconstruction">
</div>
<div><div>edited frame</div><canvas id="frame" width="320" height="320"></canvas></div>
<table id="scores"></table>
</div>
<h2>Faithfulness (explain.json)</h2>
%SUMMARY%
<script id="data" type="application/json">%DATA%</script>
<script>
const data = JSON.parse(document.getElementById('data').textContent);
const imageSelect = document.getElementById('image');
const editSelect = document.getElementById('edit');
const slider = document.getElementById('slider');
const canvas = document.getElementById('frame');
const context = canvas.getContext('2d');
const strip = new Image();
data.images.forEach((_, i) => imageSelect.add(new Option('image ' + i, i)));
data.edits.forEach((e, i) => editSelect.add(new Option(e.kind + ': ' + e.name, i)));
function draw() {
  const edit = data.edits[editSelect.value];
  const step = Number(slider.value);
  const side = strip.height;
  context.drawImage(strip, step * side, 0, side, side, 0, 0, canvas.width, canvas.height);
  const prefix = edit.kind === 'attribute' ? 'α = ' : 't = ';
  document.getElementById('step').textContent = prefix + edit.steps[step];
  const scores = edit.scores[imageSelect.value][step];
  const rows = data.heads.map((name, k) => {
    const value = scores[k];
    const width = name === 'age' ? Math.min(value, 100) : 100 * value;
    return '<tr><td>' + name + '</td><td class="barbox"><div class="bar" style="width:' +
        Math.max(0, width).toFixed(1) + '%"></div></td><td>' +
        (name === 'age' ? value.toFixed(1) + ' y' : value.toFixed(3)) + '</td></tr>';
  });
  document.getElementById('scores').innerHTML = rows.join('');
}
function load() {
  const image = data.images[imageSelect.value];
  const edit = data.edits[editSelect.value];
  document.getElementById('input').src = 'data:image/png;base64,' + image.input;
  document.getElementById('reconstruction').src = 'data:image/png;base64,' + image.reconstruction;
  slider.max = edit.steps.length - 1;
  if (Number(slider.value) > edit.steps.length - 1) slider.value = 0;
  strip.onload = draw;
  strip.src = 'data:image/png;base64,' + edit.strips[imageSelect.value];
}
imageSelect.onchange = load;
editSelect.onchange = load;
slider.oninput = draw;
// A link may choose the view: index.html#image=2&edit=5&step=8.
const chosen = new URLSearchParams(location.hash.slice(1));
imageSelect.value = Math.min(Number(chosen.get('image') || 0), data.images.length - 1);
editSelect.value = Math.min(Number(chosen.get('edit') || 0), data.edits.length - 1);
slider.max = data.edits[editSelect.value].steps.length - 1;
slider.value = chosen.has('step') ? chosen.get('step') : Math.floor(slider.max / 2);
load();
</script>
</body></html>
"""
