"""The page at ``/``: drop an image, see the top-5 classes and the attention rollout over the image as the model
sees it (resized and centre-cropped by its preprocessing). Plain HTML and JavaScript, no external resources."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitkit serve</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:820px;color:#222}
 h1{font-size:1.3em;margin:0 0 .2em} #model{color:#666;font-size:.85em;margin-bottom:1em}
 #drop{border:2px dashed #888;border-radius:10px;padding:2em;text-align:center;cursor:pointer;background:#fafafa}
 #drop.over{background:#e8f0ff;border-color:#36c}
 #out{display:flex;gap:2em;margin-top:1.5em;align-items:flex-start}
 canvas{border:1px solid #ccc;image-rendering:pixelated;width:320px;height:320px}
 .row{display:flex;align-items:center;gap:.5em;margin:.3em 0}
 .label{width:11em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
 .bar{height:14px;background:#36c;border-radius:3px}
 .pct{width:4.5em;text-align:right;font-variant-numeric:tabular-nums}
 #error{color:#b00;margin-top:1em} .cap{color:#666;font-size:.85em}
</style></head>
<body data-state="loading">
<h1>vitkit serve</h1><div id="model"></div>
<div id="drop">Drop an image here, or click to choose a file<input id="file" type="file" accept="image/*" hidden></div>
<div id="error"></div>
<div id="out">
 <div><canvas id="view" width="320" height="320"></canvas><div class="cap" id="cap"></div></div>
 <div id="top"></div>
</div>
<script>
const drop = document.getElementById('drop'), file = document.getElementById('file');
const view = document.getElementById('view'), ctx = view.getContext('2d');
let meta = null;
fetch('metadata').then(r => r.json()).then(m => {
  meta = m;
  document.getElementById('model').textContent = m.model + ' - ' + m.runtime + ', input ' + m.input_size.join('x');
  document.body.dataset.state = 'ready';
});
drop.onclick = () => file.click();
file.onchange = () => file.files[0] && show(file.files[0]);
drop.ondragover = e => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) show(e.dataTransfer.files[0]); };

async function post(path, blob) {
  const r = await fetch(path, {method: 'POST', body: blob,
    headers: {'Content-Type': blob.type || 'application/octet-stream'}});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
function heat(v) {  // dark blue -> red -> yellow
  const r = Math.min(1, 2 * v), g = Math.max(0, 2 * v - 1), b = Math.max(0, 1 - 3 * v);
  return [255 * r, 255 * g, 255 * b];
}
function drawRollout(result) {
  const img = new Image();
  img.onload = () => {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(img, 0, 0, view.width, view.height);
    const grid = result.grid, gh = grid.length, gw = grid[0].length;
    const small = document.createElement('canvas'); small.width = gw; small.height = gh;
    const sctx = small.getContext('2d'), data = sctx.createImageData(gw, gh);
    const flat = grid.flat(), lo = Math.min(...flat), span = Math.max(...flat) - lo || 1;
    for (let y = 0; y < gh; y++) for (let x = 0; x < gw; x++) {
      const v = (grid[y][x] - lo) / span, [r, g, b] = heat(v), i = 4 * (y * gw + x);
      data.data.set([r, g, b, 170 * v + 30], i);
    }
    sctx.putImageData(data, 0, 0);
    ctx.drawImage(small, 0, 0, view.width, view.height);
    document.getElementById('cap').textContent =
      'attention rollout (' + gh + 'x' + gw + ' patches) over the model input';
    document.body.dataset.state = 'done';
  };
  img.src = result.image;
}
async function show(blob) {
  document.getElementById('error').textContent = '';
  document.body.dataset.state = 'working';
  try {
    const pred = await post('predict?top_k=5', blob);
    const top = document.getElementById('top'); top.innerHTML = '';
    for (const p of pred.top_k) {
      const row = document.createElement('div'); row.className = 'row';
      row.innerHTML = '<span class="label"></span><span class="bar"></span><span class="pct"></span>';
      row.children[0].textContent = p.label; row.children[0].title = p.label;
      row.children[1].style.width = Math.max(2, 200 * p.probability) + 'px';
      row.children[2].textContent = (100 * p.probability).toFixed(1) + '%';
      top.appendChild(row);
    }
    if (meta && meta.rollout) drawRollout(await post('rollout', blob));
    else { document.getElementById('cap').textContent = 'no attention rollout for this model';
           document.body.dataset.state = 'done'; }
  } catch (err) {
    document.getElementById('error').textContent = err.message;
    document.body.dataset.state = 'error';
  }
}
</script></body></html>
"""
