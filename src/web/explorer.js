// The ensemble explorer: which member the aggregators trusted where. Fetches one image's
// attention-map bundle (GET /v1/jobs/{id}/images/{k}/maps) only when opened, draws the UNet's
// aggregation points from the maps' shapes, and paints the chosen point and step over the image
// (each member a colour, mixed by weight), with a legend and the members' mean weights.
import * as api from './api.js';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

/// The server's expert colours (ColorBrewer Set1, as in its heat-map PNGs).
export const COLOURS = [
  [228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163],
  [255, 127, 0], [255, 255, 51], [166, 86, 40], [247, 129, 191],
];

function colour(i) {
  if (i < COLOURS.length) return COLOURS[i];
  // Beyond 8 members: spread hues evenly (never happens with the server's own heat maps).
  const h = (i * 137.5) % 360;
  const f = (n) => {
    const k = (n + h / 30) % 12;
    return Math.round(255 * (0.5 - 0.4 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

const css = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

/// Decodes a bundle into points: [{point, n, h, w, steps: Map(step -> Float32Array), mean}].
export function decodeBundle(bundle) {
  const byPoint = new Map();
  for (const m of bundle.attention_maps || []) {
    const [n, h, w] = m.shape;
    let values;
    if (m.f32_base64) values = api.decodeF32(m.f32_base64);
    else if (m.f16_base64) values = api.decodeF16(m.f16_base64);
    else continue;
    if (!byPoint.has(m.point)) byPoint.set(m.point, { point: m.point, n, h, w, steps: new Map(), mean: null });
    const p = byPoint.get(m.point);
    if (m.step === null || m.step === undefined) p.mean = values;
    else p.steps.set(m.step, values);
  }
  const points = [...byPoint.values()].sort((a, b) => a.point - b.point);
  for (const p of points) {
    if (!p.mean && p.steps.size) {
      const all = [...p.steps.values()];
      const mean = new Float32Array(all[0].length);
      for (const v of all) for (let i = 0; i < v.length; i++) mean[i] += v[i] / all.length;
      p.mean = mean;
    }
  }
  return points;
}

/// Down, mid and up parts of the UNet from the points' resolutions: the middle point at the
/// lowest resolution is the mid block; before it the way down, after it the way up.
export function sections(points) {
  const minH = Math.min(...points.map((p) => p.h));
  const P = points.length;
  let mid = P % 2 === 1 && points[(P - 1) / 2].h === minH ? (P - 1) / 2 : -1;
  if (mid < 0) {
    const lows = points.map((p, i) => (p.h === minH ? i : -1)).filter((i) => i >= 0);
    mid = lows[Math.floor(lows.length / 2)];
  }
  return points.map((_, i) => (i < mid ? 'down' : i === mid ? 'mid' : 'up'));
}

export class Explorer {
  constructor() {
    this.item = null;
    this.points = [];
    this.point = 0;
    this.step = 0; // 0: mean of all steps; k: step k - 1
    this.experts = [];
    $('explorer-close').addEventListener('click', () => this.close());
    $('step-slider').addEventListener('input', () => this.setStep(Number($('step-slider').value)));
    $('opacity').addEventListener('input', () => this.setOpacity());
    $('explorer-img').addEventListener('load', () => this.draw());
  }

  close() {
    $('explorer').hidden = true;
    this.item?.button?.focus();
  }

  async open(item) {
    this.item = item;
    const sec = $('explorer');
    sec.hidden = false;
    $('explorer-info').textContent = `“${item.params.prompt}” · seed ${item.seed} · mode ${item.params.ensemble_mode}`;
    $('explorer-body').hidden = true;
    $('explorer-status').textContent = 'Loading attention maps…';
    sec.scrollIntoView({ block: 'start' });
    sec.focus({ preventScroll: true });
    try {
      if (!item.bundle) {
        const bundle = await api.call('GET', item.mapsUrl);
        item.bundle = { experts: bundle.experts || [], points: decodeBundle(bundle) };
      }
    } catch (e) {
      $('explorer-status').textContent = `Could not load the maps: ${e.message}`;
      return;
    }
    if (this.item !== item) return;
    this.experts = item.bundle.experts;
    this.points = item.bundle.points;
    if (!this.points.length) {
      $('explorer-status').textContent = 'This image has no attention maps.';
      return;
    }
    $('explorer-status').textContent = '';
    $('explorer-body').hidden = false;
    const steps = Math.max(...this.points.map((p) => p.steps.size));
    const slider = $('step-slider');
    slider.max = steps;
    slider.disabled = steps === 0;
    this.point = Math.min(this.point, this.points.length - 1);
    this.step = Math.min(this.step, steps);
    slider.value = this.step;
    this.legend();
    this.diagram();
    this.setOpacity();
    const img = $('explorer-img');
    img.alt = `the image, seed ${item.seed}`;
    if (img.src !== item.url) img.src = item.url;
    else this.draw();
    this.select(this.point, false);
  }

  legend() {
    const ul = $('legend');
    ul.replaceChildren(...this.experts.map((name, i) => {
      const li = document.createElement('li');
      const sw = document.createElement('span');
      sw.className = 'swatch';
      sw.style.background = css(colour(i));
      li.append(sw, name);
      return li;
    }));
  }

  diagram() {
    const pts = this.points;
    const parts = sections(pts);
    const res = [...new Set(pts.map((p) => p.h))].sort((a, b) => b - a);
    const dx = 36;
    const dy = 40;
    const left = 58;
    const top = 34;
    const W = left + dx * (pts.length - 1) + 24;
    const H = top + dy * (res.length - 1) + 40;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    svg.setAttribute('role', 'radiogroup');
    svg.setAttribute('aria-label', 'aggregation points of the UNet (down, mid, up); arrow keys move');
    svg.style.minWidth = `${Math.round(Math.min(W, 26 * pts.length + 60))}px`; // taps need room: scroll sideways on phones
    const xy = (i) => [left + dx * i, top + dy * res.indexOf(pts[i].h)];
    for (const [k, h] of res.entries()) {
      const t = document.createElementNS(SVG, 'text');
      t.setAttribute('x', 4);
      t.setAttribute('y', top + dy * k + 4);
      t.setAttribute('class', 'res');
      t.textContent = `${h}×${pts.find((p) => p.h === h).w}`;
      svg.append(t);
    }
    for (const part of ['down', 'mid', 'up']) {
      const idx = parts.map((s, i) => (s === part ? i : -1)).filter((i) => i >= 0);
      if (!idx.length) continue;
      const t = document.createElementNS(SVG, 'text');
      const x = (xy(idx[0])[0] + xy(idx[idx.length - 1])[0]) / 2;
      t.setAttribute('x', x);
      t.setAttribute('y', 14);
      t.setAttribute('text-anchor', 'middle');
      t.setAttribute('class', `part ${part}`);
      t.textContent = part;
      svg.append(t);
    }
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', pts.map((_, i) => xy(i).join(',')).join(' '));
    line.setAttribute('class', 'path');
    svg.append(line);
    this.nodes = pts.map((p, i) => {
      const [x, y] = xy(i);
      const g = document.createElementNS(SVG, 'g');
      g.setAttribute('role', 'radio');
      g.setAttribute('tabindex', '-1');
      g.setAttribute('class', `pt ${parts[i]}`);
      g.dataset.point = p.point;
      g.setAttribute('aria-label', `point ${p.point}, ${parts[i]}, ${p.h}×${p.w}`);
      const c = document.createElementNS(SVG, 'circle');
      c.setAttribute('cx', x);
      c.setAttribute('cy', y);
      c.setAttribute('r', 11);
      const t = document.createElementNS(SVG, 'text');
      t.setAttribute('x', x);
      t.setAttribute('y', y + 4);
      t.setAttribute('text-anchor', 'middle');
      t.textContent = p.point;
      g.append(c, t);
      g.addEventListener('click', () => this.select(i));
      g.addEventListener('keydown', (e) => this.key(e, i));
      svg.append(g);
      return g;
    });
    this.parts = parts;
    $('unet').replaceChildren(svg);
  }

  key(e, i) {
    const last = this.points.length - 1;
    const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: last }[e.key];
    if (to !== undefined) {
      e.preventDefault();
      this.select(Math.max(0, Math.min(last, to)));
    } else if (e.key === ' ' || e.key === 'Enter') {
      e.preventDefault();
      this.select(i);
    }
  }

  select(i, focus = true) {
    this.point = i;
    for (const [k, g] of this.nodes.entries()) {
      g.setAttribute('aria-checked', k === i ? 'true' : 'false');
      g.setAttribute('tabindex', k === i ? '0' : '-1');
    }
    if (focus) this.nodes[i].focus();
    const p = this.points[i];
    $('point-label').textContent = `Point ${p.point} (${this.parts[i]}, ${p.h}×${p.w}, ${p.n} members)`;
    this.draw();
  }

  setStep(s) {
    this.step = s;
    this.draw();
  }

  setOpacity() {
    const v = Number($('opacity').value);
    $('opacity-out').textContent = `${v}%`;
    $('overlay').style.opacity = String(v / 100);
  }

  /// The values of the current point and step: Float32Array [n, h, w].
  values() {
    const p = this.points[this.point];
    if (!p) return null;
    if (this.step === 0) return p.mean;
    return p.steps.get(this.step - 1) || p.mean;
  }

  draw() {
    const p = this.points[this.point];
    const v = this.values();
    if (!p || !v) return;
    const total = Math.max(...this.points.map((q) => q.steps.size));
    const mean = total ? `mean of all ${total} steps` : 'mean over steps';
    $('step-out').textContent = this.step === 0 ? mean : `step ${this.step} of ${total}`;
    const { n, h, w } = p;
    const small = document.createElement('canvas');
    small.width = w;
    small.height = h;
    const sctx = small.getContext('2d');
    const data = sctx.createImageData(w, h);
    const sums = new Float64Array(n);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const rgb = [0, 0, 0];
        for (let e = 0; e < n; e++) {
          const wt = v[e * h * w + y * w + x];
          sums[e] += wt;
          const c = colour(e);
          rgb[0] += wt * c[0];
          rgb[1] += wt * c[1];
          rgb[2] += wt * c[2];
        }
        const at = (y * w + x) * 4;
        data.data[at] = rgb[0];
        data.data[at + 1] = rgb[1];
        data.data[at + 2] = rgb[2];
        data.data[at + 3] = 255;
      }
    }
    sctx.putImageData(data, 0, 0);
    const img = $('explorer-img');
    const canvas = $('overlay');
    canvas.width = img.naturalWidth || this.item.params.width;
    canvas.height = img.naturalHeight || this.item.params.height;
    const ctx = canvas.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.dataset.point = p.point;
    canvas.dataset.step = this.step;
    this.bars(Array.from(sums, (s) => s / (h * w)));
  }

  bars(means) {
    const box = $('bars');
    box.replaceChildren(...means.map((m, i) => {
      const row = document.createElement('div');
      row.className = 'bar-row';
      const name = document.createElement('span');
      name.className = 'bar-name';
      name.textContent = this.experts[i] || `member ${i}`;
      const track = document.createElement('span');
      track.className = 'bar-track';
      track.setAttribute('role', 'meter');
      track.setAttribute('aria-valuemin', '0');
      track.setAttribute('aria-valuemax', '1');
      track.setAttribute('aria-valuenow', m.toFixed(3));
      track.setAttribute('aria-label', `mean weight of ${name.textContent}`);
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = `${Math.max(0, Math.min(1, m)) * 100}%`;
      bar.style.background = css(colour(i));
      track.append(bar);
      const val = document.createElement('span');
      val.className = 'bar-val';
      val.textContent = m.toFixed(2);
      row.append(name, track, val);
      return row;
    }));
  }
}
