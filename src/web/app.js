// The playground: a form over POST /v1/jobs, progress from GET /v1/jobs/{id}/events, a gallery
// of the server's PNGs, a compare strip over every mode, and the ensemble explorer (explorer.js).
import * as api from './api.js';
import { Explorer } from './explorer.js';

const $ = (id) => document.getElementById(id);

const MODE_NOTES = {
  afa: 'AFA: the trained aggregators mix the members per pixel at every aggregation point.',
  mean: 'Mean: uniform averaging of the members at every point (no aggregators).',
  merge: 'Merge: one UNet with the members’ parameters averaged by weight.',
  magicfusion: 'MagicFusion: saliency-aware blending of the members’ noise predictions.',
};
const MAP_MODES = new Set(['afa', 'mean']);

/// Which form field shows an error the server names with `param`.
const PARAM_FIELD = {
  prompt: 'prompt',
  negative_prompt: 'negative_prompt',
  model: 'model',
  ensemble_mode: 'ensemble_mode',
  steps: 'steps',
  guidance_scale: 'guidance_scale',
  scheduler: 'scheduler',
  size: 'size',
  width: 'size',
  height: 'size',
  seed: 'seed',
  n: 'n',
  return_attention_maps: 'return_attention_maps',
};

const state = {
  info: null,
  ensemble: null,
  ready: false,
  lastSeed: null,
  results: [],
  cards: new Map(),
  explorer: null,
  needKey: false,
};

// ---------- text helpers ----------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function fmtMs(ms) {
  if (ms === undefined || ms === null) return '–';
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

function fmtSecs(s) {
  if (!Number.isFinite(s)) return '–';
  if (s < 60) return `${Math.max(0, Math.round(s))} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// ---------- banner and server state ----------

let bannerTimer = null;

function banner(text, kind = 'error', tag = '') {
  const b = $('banner');
  clearInterval(bannerTimer);
  b.dataset.kind = tag;
  if (!text) {
    b.hidden = true;
    b.textContent = '';
    return;
  }
  b.className = `banner ${kind}`;
  b.textContent = text;
  b.hidden = false;
}

/// A banner that counts down a Retry-After.
function retryBanner(prefix, seconds) {
  let left = Math.max(1, Math.ceil(seconds || 1));
  banner(`${prefix} Retry in ${left} s (Retry-After).`, 'warn');
  bannerTimer = setInterval(() => {
    left -= 1;
    if (left <= 0) {
      clearInterval(bannerTimer);
      $('banner').textContent = `${prefix} You can retry now.`;
    } else {
      $('banner').textContent = `${prefix} Retry in ${left} s (Retry-After).`;
    }
  }, 1000);
}

function setStatus(text, kind) {
  const s = $('server-status');
  s.textContent = text;
  s.dataset.state = kind;
}

function needKey(message) {
  setStatus('This server needs an API key.', 'error');
  banner(`${message || 'This server needs an API key.'}: enter it under “API key”.`, 'error');
  if (!state.needKey) {
    $('key-box').open = true;
    $('api-key').focus();
  }
  state.needKey = true;
}

function updateButtons() {
  const ok = state.ready && state.ensemble;
  $('generate').disabled = !ok;
  $('compare-btn').disabled = !ok;
}

async function loadInfo() {
  try {
    state.info = await api.call('GET', '/info');
  } catch (e) {
    state.info = null;
    if (e.status === 401) needKey(e.message);
    else setStatus(`Cannot reach the server: ${e.message}`, 'error');
    updateButtons();
    return false;
  }
  const info = state.info;
  fillEnsembles(info);
  return true;
}

async function pollReady() {
  let r;
  try {
    r = await api.ready();
  } catch (e) {
    state.ready = false;
    setStatus(`The server does not answer (${e.message}).`, 'error');
    updateButtons();
    return;
  }
  const info = state.info;
  if (r.ready) {
    if (state.needKey) return; // asked once; the key form retries
    if (!state.ready || !info || !info.ensembles) {
      state.ready = await loadInfo();
    }
    if (state.ready && $('banner').dataset.kind === 'state') banner('');
    const i = state.info;
    if (i && state.ready) {
      const bits = ['Ready', i.device, i.dtype, `v${i.version}`].filter(Boolean);
      setStatus(bits.join(' · '), 'ready');
    }
  } else {
    state.ready = false;
    const draining = r.code === 'draining';
    const text = draining
      ? 'The server is draining (shutting down): it finishes running work and accepts no new jobs.'
      : 'Models are loading; generation starts when they are ready.';
    setStatus(draining ? 'Draining' : 'Loading models…', draining ? 'error' : 'warn');
    banner(`${text} (/ready: ${r.status}${r.retryAfter ? `, retry after ${r.retryAfter} s` : ''})`, 'warn', 'state');
    if (!state.info && !state.needKey) await loadInfo();
  }
  updateButtons();
}

// ---------- the form ----------

function option(value, text, selected) {
  const o = el('option', { value, text: text || value });
  if (selected) o.selected = true;
  return o;
}

function fillEnsembles(info) {
  const sel = $('model');
  const list = info.ensembles || [];
  const current = sel.value || info.default_ensemble;
  sel.replaceChildren(
    ...list.map((e) => option(e.name, e.untrained ? `${e.name} (untrained)` : e.name, e.name === current)),
  );
  if (info.limits) {
    $('steps').max = info.limits.max_steps;
    $('guidance_scale').max = info.limits.max_guidance;
    $('n').max = info.limits.max_n;
  }
  chooseEnsemble(sel.value, true);
}

function chooseEnsemble(name, keepValues = false) {
  const e = (state.info?.ensembles || []).find((x) => x.name === name) || null;
  const changed = !state.ensemble || state.ensemble.name !== name;
  state.ensemble = e;
  if (!e) return;
  const note = $('model-note');
  note.replaceChildren();
  if (e.untrained) {
    const why = (e.note || 'random weights: every image is noise').replace(/^UNTRAINED:\s*/, '');
    note.append(el('strong', { class: 'badge untrained', text: 'UNTRAINED' }), ' ', why.charAt(0).toUpperCase() + why.slice(1));
  } else if (e.description) {
    note.append(e.description);
  }
  note.append(' ', el('span', { class: 'members', text: `Members: ${e.members.map((m) => m.name).join(', ')}` }));

  const mode = $('ensemble_mode');
  const keepMode = keepValues && !changed ? mode.value : e.defaults.ensemble_mode;
  mode.replaceChildren(...e.modes.map((m) => option(m, m, m === keepMode)));
  const sched = $('scheduler');
  const keepSched = keepValues && !changed ? sched.value : e.defaults.scheduler;
  sched.replaceChildren(...e.schedulers.map((s) => option(s, s, s === keepSched)));

  const size = $('size');
  const defSize = `${e.defaults.width}x${e.defaults.height}`;
  const sizes = e.allowed_sizes.length ? e.allowed_sizes : [defSize];
  const keepSize = keepValues && !changed ? size.value : defSize;
  size.replaceChildren(...sizes.map((s) => option(s, s.replace('x', ' × '), s === keepSize)));
  if (!e.allowed_sizes.length) size.append(option('custom', 'custom…', keepSize === 'custom'));
  const lim = state.info.limits || {};
  for (const id of ['width', 'height']) {
    $(id).min = lim.min_side || 8;
    $(id).max = lim.max_side || 2048;
  }
  if (changed || !keepValues || !$('width').value) {
    $('width').value = e.defaults.width;
    $('height').value = e.defaults.height;
  }
  $('custom-size').hidden = size.value !== 'custom';
  if (changed || !keepValues || !$('steps').value) $('steps').value = e.defaults.steps;
  if (changed || !keepValues || !$('guidance_scale').value) $('guidance_scale').value = e.defaults.guidance_scale;
  modeChanged();
}

function modeChanged() {
  const m = $('ensemble_mode').value;
  const single = m.startsWith('single:') ? `Single: member ${m.slice(7)} alone, as a plain SD model.` : '';
  $('mode-note').textContent = MODE_NOTES[m] || single;
  const maps = $('maps');
  maps.disabled = !MAP_MODES.has(m);
  $('maps-note').textContent = maps.disabled
    ? `Mode ${m} has no aggregators, so no attention maps.`
    : 'Lets the explorer show which member drew which part (steps: all, f16 arrays).';
}

function clearErrors() {
  for (const p of document.querySelectorAll('.field-error')) {
    p.hidden = true;
    p.textContent = '';
  }
  for (const i of document.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
}

/// Shows `message` next to the field the server named, or under the form.
function showFieldError(param, message) {
  const base = (param || '').split('.')[0];
  const field = PARAM_FIELD[base];
  const p = field ? $(`err-${field}`) : $('form-error');
  p.textContent = message;
  p.hidden = false;
  if (field) {
    const input = field === 'size' ? ($('size').value === 'custom' ? $(param === 'height' ? 'height' : 'width') : $('size')) : $(field === 'return_attention_maps' ? 'maps' : field);
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      input.focus();
    }
  }
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  if (v === '') return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : v; // a non-number goes to the server, which names the field
}

/// Reads the form into a /v1/jobs body (only what the user set; the server fills defaults).
function readForm() {
  const body = { prompt: $('prompt').value };
  const neg = $('negative_prompt').value;
  if (neg) body.negative_prompt = neg;
  if ($('model').value) body.model = $('model').value;
  if ($('ensemble_mode').value) body.ensemble_mode = $('ensemble_mode').value;
  for (const [id, key] of [['steps', 'steps'], ['guidance_scale', 'guidance_scale'], ['n', 'n']]) {
    const v = numberOrNull(id);
    if (v !== null) body[key] = v;
  }
  if ($('scheduler').value) body.scheduler = $('scheduler').value;
  if ($('size').value === 'custom') {
    const w = numberOrNull('width');
    const h = numberOrNull('height');
    if (w !== null) body.width = w;
    if (h !== null) body.height = h;
  } else if ($('size').value) {
    body.size = $('size').value;
  }
  const seed = $('seed').value.trim();
  if (seed !== '') body.seed = /^\d+$/.test(seed) ? (Number.isSafeInteger(Number(seed)) ? Number(seed) : BigInt(seed)) : seed;
  if ($('maps').checked && !$('maps').disabled) {
    body.return_attention_maps = { steps: 'all', format: ['f16'] };
  }
  return body;
}

/// Puts a job's parameters back into the form ("send to prompt").
function sendToPrompt(params) {
  $('prompt').value = params.prompt || '';
  $('negative_prompt').value = params.negative_prompt || '';
  if (params.model && [...$('model').options].some((o) => o.value === params.model)) {
    $('model').value = params.model;
    chooseEnsemble(params.model, false);
  }
  if (params.ensemble_mode && [...$('ensemble_mode').options].some((o) => o.value === params.ensemble_mode)) {
    $('ensemble_mode').value = params.ensemble_mode;
  }
  if (params.scheduler) $('scheduler').value = params.scheduler;
  $('steps').value = params.steps ?? '';
  $('guidance_scale').value = params.guidance_scale ?? '';
  const size = `${params.width}x${params.height}`;
  if ([...$('size').options].some((o) => o.value === size)) {
    $('size').value = size;
  } else if ([...$('size').options].some((o) => o.value === 'custom')) {
    $('size').value = 'custom';
    $('width').value = params.width;
    $('height').value = params.height;
  }
  $('custom-size').hidden = $('size').value !== 'custom';
  $('seed').value = params.seed !== undefined && params.seed !== null ? String(params.seed) : '';
  $('n').value = 1;
  $('maps').checked = Boolean(params.return_attention_maps);
  modeChanged();
  $('prompt').focus();
  $('prompt').scrollIntoView({ block: 'center' });
}

/// Reports a refused submission where it belongs. Returns true when handled.
function reportSubmitError(e) {
  if (!(e instanceof api.ApiError)) {
    showFieldError(null, `Could not reach the server: ${e.message}`);
    return;
  }
  if (e.status === 400 || e.status === 413 || (e.status === 404 && e.param)) {
    showFieldError(e.param, e.message);
  } else if (e.status === 401) {
    needKey(e.message);
  } else if (e.status === 429) {
    retryBanner(`The queue is full (429): ${e.message}.`, e.retryAfter);
  } else if (e.status === 503) {
    retryBanner(`The server cannot take work now (503 ${e.code}): ${e.message}.`, e.retryAfter);
    pollReady();
  } else {
    showFieldError(null, `${e.status} ${e.code || ''}: ${e.message}`);
  }
}

// ---------- job cards (progress) ----------

class JobCard {
  constructor(title) {
    this.started = null;
    this.stepAt = [];
    this.progress = el('progress', { max: 1, value: 0, 'aria-label': `progress of ${title}` });
    this.text = el('p', { class: 'job-text', text: 'Submitting…' });
    this.cancelBtn = el('button', { type: 'button', class: 'cancel', text: 'Cancel', onclick: () => this.cancel() });
    this.preview = el('img', { class: 'preview', alt: 'preview while denoising', hidden: true });
    this.root = el('div', { class: 'job', 'data-status': 'submitting' },
      el('div', { class: 'job-head' }, el('strong', { class: 'job-title', text: title }), this.cancelBtn),
      this.progress, this.text, this.preview);
    const jobs = $('jobs');
    jobs.querySelector('.empty')?.remove();
    // Newest first: keep the three latest finished cards.
    for (const old of [...jobs.querySelectorAll('.job[data-done]')].slice(3)) old.remove();
    jobs.prepend(this.root);
    this.onCancel = null;
  }

  set status(s) {
    this.root.dataset.status = s;
  }

  queued(position) {
    this.status = 'queued';
    this.text.textContent = position === null || position === undefined
      ? 'Queued…'
      : `Queued: ${position} image${position === 1 ? '' : 's'} ahead`;
  }

  step(step, total) {
    this.status = 'running';
    const now = performance.now();
    if (!this.stepAt.length || step > this.stepAt[this.stepAt.length - 1][0]) this.stepAt.push([step, now]);
    this.progress.max = total || 1;
    this.progress.value = step;
    let eta = '';
    if (this.stepAt.length >= 2) {
      const [s0, t0] = this.stepAt[0];
      const [s1, t1] = this.stepAt[this.stepAt.length - 1];
      const per = (t1 - t0) / Math.max(1, s1 - s0) / 1000;
      eta = ` · ETA ${fmtSecs(per * (total - step))}`;
    }
    this.text.textContent = `Step ${step} / ${total}${eta}`;
  }

  showPreview(data) {
    const b64 = data && (data.png_base64 || data.image_base64 || data.b64_json);
    if (typeof b64 !== 'string') return;
    const type = { jpeg: 'image/jpeg', webp: 'image/webp' }[data.output_format] || 'image/png';
    this.preview.src = `data:${type};base64,${b64}`;
    this.preview.hidden = false;
  }

  finish(status, message) {
    this.status = status;
    this.root.dataset.done = '1';
    this.cancelBtn.hidden = true;
    this.preview.hidden = true;
    if (status === 'succeeded') this.progress.value = this.progress.max;
    this.text.textContent = message;
  }

  async cancel() {
    if (!this.jobId) return;
    this.cancelBtn.disabled = true;
    this.text.textContent = 'Cancelling…';
    if (this.onCancel) this.onCancel();
    try {
      await api.call('DELETE', `/v1/jobs/${this.jobId}`);
    } catch (e) {
      if (e.status !== 409) this.text.textContent = `Cancel failed: ${e.message}`;
    }
  }
}

/// Follows job `id` on its event stream until it ends; resolves to the final job view.
async function follow(id, card) {
  let final = null;
  const abort = new AbortController();
  try {
    await api.events(`/v1/jobs/${id}/events`, (name, data) => {
      if (name === 'queued') {
        if (data.status === 'running' && data.position === 0) card.step(0, card.progress.max);
        else card.queued(data.position);
      } else if (name === 'progress') card.step(data.step, data.total);
      else if (name === 'preview') card.showPreview(data);
      else if (name === 'result' || name === 'error') final = data;
    }, abort.signal);
  } catch (e) {
    if (e.status === 401) needKey(e.message);
  }
  if (!final || !final.status) {
    // The stream ended early (network) or sent an envelope: ask the job itself.
    try {
      final = await api.call('GET', `/v1/jobs/${id}`);
    } catch (e) {
      final = { status: 'failed', error: { message: e.message } };
    }
  }
  return final;
}

function endCard(card, view) {
  if (view.status === 'succeeded') {
    const t = view.timings || {};
    card.finish('succeeded', `Done · denoise ${fmtMs(t.denoise_ms)} · total ${fmtMs(totalMs(t))}`);
  } else if (view.status === 'cancelled') {
    card.finish('cancelled', 'Cancelled.');
  } else {
    card.finish('failed', `Failed: ${view.error?.message || view.status}`);
  }
}

function totalMs(t) {
  return ['queue_ms', 'text_encode_ms', 'denoise_ms', 'decode_ms', 'png_encode_ms'].reduce((a, k) => a + (t[k] || 0), 0);
}

// ---------- generate ----------

async function generate(ev) {
  ev.preventDefault();
  clearErrors();
  const body = readForm();
  $('generate').disabled = true;
  let view;
  const card = new JobCard(body.prompt.slice(0, 60) || '(empty prompt)');
  try {
    view = await api.call('POST', '/v1/jobs', body);
  } catch (e) {
    card.root.remove();
    if (!$('jobs').children.length) $('jobs').append(el('p', { class: 'hint empty', text: 'Nothing running.' }));
    reportSubmitError(e);
    updateButtons();
    return;
  }
  updateButtons();
  card.jobId = view.id;
  card.root.dataset.job = view.id;
  card.queued(view.queue_position);
  const final = await follow(view.id, card);
  endCard(card, final);
  if (final.status === 'succeeded') await addResults(final);
}

function ensembleOf(name) {
  return (state.info?.ensembles || []).find((e) => e.name === name) || null;
}

async function addResults(view) {
  const gallery = $('gallery');
  gallery.querySelector('.empty')?.remove();
  for (const img of view.images) {
    const blob = await api.blob(img.url);
    const item = {
      jobId: view.id,
      index: img.index,
      seed: img.seed,
      params: { ...view.parameters, seed: img.seed },
      timings: view.timings || {},
      url: URL.createObjectURL(blob),
      mapsUrl: img.attention_maps_url || null,
      model: view.model,
    };
    state.results.push(item);
    state.lastSeed = img.seed;
    $('seed-reuse').disabled = false;
    gallery.prepend(galleryItem(item));
  }
}

function galleryItem(item) {
  const p = item.params;
  const e = ensembleOf(item.model);
  const t = item.timings;
  const name = `afa-${item.jobId}-${item.index}-seed${item.seed}.png`;
  const dl = el('a', { href: item.url, download: name, class: 'button', text: 'Download PNG' });
  const send = el('button', { type: 'button', text: 'Send to prompt', onclick: () => sendToPrompt(p) });
  const explore = item.mapsUrl
    ? el('button', { type: 'button', class: 'explore', text: 'Explore maps', onclick: (ev) => { item.button = ev.currentTarget; state.explorer.open(item); } })
    : null;
  const facts = el('dl', { class: 'facts' },
    el('dt', { text: 'seed' }), el('dd', { class: 'seed', text: String(item.seed) }),
    el('dt', { text: 'mode' }), el('dd', { text: p.ensemble_mode }),
    el('dt', { text: 'model' }), el('dd', { text: p.model }),
    el('dt', { text: 'size' }), el('dd', { text: `${p.width}×${p.height}` }),
    el('dt', { text: 'steps' }), el('dd', { text: `${p.steps} · ${p.scheduler} · cfg ${p.guidance_scale}` }),
    el('dt', { text: 'time' }), el('dd', { text: `denoise ${fmtMs(t.denoise_ms)}, total ${fmtMs(totalMs(t))}` }),
  );
  return el('figure', { class: 'card', 'data-job': item.jobId, 'data-index': item.index },
    el('img', { src: item.url, alt: `“${p.prompt}”, seed ${item.seed}, mode ${p.ensemble_mode}`, width: p.width, height: p.height }),
    el('figcaption', {},
      el('p', { class: 'prompt', text: p.prompt }),
      e && e.untrained ? el('p', { class: 'badge untrained', text: 'untrained ensemble: noise' }) : null,
      facts,
      el('div', { class: 'actions' }, dl, send, explore)));
}

// ---------- compare ----------

async function compare() {
  clearErrors();
  const e = state.ensemble;
  if (!e) return;
  const base = readForm();
  delete base.return_attention_maps;
  base.n = 1;
  if (base.seed === undefined) {
    base.seed = crypto.getRandomValues(new Uint32Array(1))[0];
    $('seed').value = String(base.seed);
  }
  if (!base.prompt.trim()) {
    showFieldError('prompt', 'prompt must not be empty');
    return;
  }
  const sec = $('compare-sec');
  sec.hidden = false;
  $('compare-info').textContent = `“${base.prompt}” · seed ${base.seed} · ${e.modes.length} modes of ${e.name}`;
  const grid = $('compare');
  grid.replaceChildren();
  $('compare-btn').disabled = true;
  const cells = e.modes.map((mode) => {
    const status = el('p', { class: 'cell-status', text: 'submitting…' });
    const cell = el('figure', { class: 'cell', 'data-mode': mode }, el('div', { class: 'cell-img' }), el('figcaption', {}, el('strong', { text: mode }), status));
    grid.append(cell);
    return { mode, cell, status };
  });
  const card = new JobCard(`Compare: ${e.modes.length} modes`);
  card.progress.max = cells.length;
  const ids = [];
  card.onCancel = () => ids.slice(1).forEach((id) => api.call('DELETE', `/v1/jobs/${id}`).catch(() => {}));
  // Submit every mode first (they queue in order), then follow them one stream at a time.
  for (const c of cells) {
    try {
      const v = await api.call('POST', '/v1/jobs', { ...base, ensemble_mode: c.mode });
      c.id = v.id;
      ids.push(v.id);
      c.status.textContent = 'queued';
    } catch (err) {
      c.status.textContent = `refused: ${err.message}`;
      c.cell.dataset.status = 'failed';
      if (err.status === 429 || err.status === 503 || err.status === 401 || err.status === 400) {
        reportSubmitError(err);
        break;
      }
    }
  }
  if (ids.length) card.jobId = ids[0];
  let done = 0;
  for (const c of cells) {
    if (!c.id) continue;
    card.jobId = c.id;
    const sub = { step: (s, t) => { c.status.textContent = `step ${s} / ${t}`; }, queued: (p) => { c.status.textContent = p ? `queued (${p} ahead)` : 'queued'; }, showPreview() {}, progress: { max: 1 } };
    card.text.textContent = `Mode ${c.mode} (${done + 1} / ${ids.length})`;
    const view = await follow(c.id, sub);
    done += 1;
    card.progress.value = done;
    c.cell.dataset.status = view.status;
    if (view.status === 'succeeded') {
      const img = view.images[0];
      const blob = await api.blob(img.url);
      const url = URL.createObjectURL(blob);
      const p = view.parameters;
      c.cell.querySelector('.cell-img').append(el('img', { src: url, alt: `mode ${c.mode}, seed ${img.seed}`, width: p.width, height: p.height }));
      c.status.replaceChildren(
        `seed ${img.seed} · ${fmtMs(view.timings?.denoise_ms)} `,
        el('a', { href: url, download: `afa-compare-${c.mode.replace(':', '-')}-seed${img.seed}.png`, text: 'PNG' }));
    } else {
      c.status.textContent = view.status === 'cancelled' ? 'cancelled' : `failed: ${view.error?.message || ''}`;
    }
  }
  const cancelled = cells.some((c) => c.cell.dataset.status === 'cancelled');
  card.finish(cancelled ? 'cancelled' : 'succeeded', cancelled ? 'Cancelled.' : `Done: ${done} modes side by side below.`);
  sec.dataset.done = '1';
  updateButtons();
}

// ---------- start ----------

function wire() {
  $('gen-form').addEventListener('submit', generate);
  $('compare-btn').addEventListener('click', compare);
  $('model').addEventListener('change', () => chooseEnsemble($('model').value));
  $('ensemble_mode').addEventListener('change', modeChanged);
  $('size').addEventListener('change', () => { $('custom-size').hidden = $('size').value !== 'custom'; });
  $('seed-random').addEventListener('click', () => { $('seed').value = ''; $('seed').focus(); });
  $('seed-reuse').addEventListener('click', () => {
    if (state.lastSeed !== null) $('seed').value = String(state.lastSeed);
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('gen-form').requestSubmit();
  });
  $('api-key').value = api.getKey();
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    api.setKey($('api-key').value.trim());
    banner('');
    state.needKey = false;
    state.ready = false;
    pollReady();
  });
  $('key-clear').addEventListener('click', () => {
    api.setKey('');
    $('api-key').value = '';
    state.needKey = false;
    state.ready = false;
    pollReady();
  });
  state.explorer = new Explorer();
}

wire();
pollReady();
setInterval(pollReady, 5000);
