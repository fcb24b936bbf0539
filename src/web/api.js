// The page's only door to the server: the public HTTP API, called exactly as any client would.
// fetch() everywhere (not EventSource, not <img src>), because those cannot send a bearer key.

const KEY_STORAGE = 'afa.apiKey';

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || '';
  } catch {
    return '';
  }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage disabled (private mode): the key then lives only in the field.
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

/// A refusal from the server: the error envelope plus status and Retry-After.
export class ApiError extends Error {
  constructor(status, envelope, retryAfter) {
    const e = (envelope && envelope.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
    this.type = e.type || null;
    this.retryAfter = retryAfter;
  }
}

/// JSON.parse that keeps integers beyond 2^53 (u64 seeds) exact, as BigInt.
export function parseJson(text) {
  return JSON.parse(text, (key, value, ctx) => {
    if (typeof value === 'number' && !Number.isSafeInteger(value) && ctx && /^\d+$/.test(ctx.source)) {
      return BigInt(ctx.source);
    }
    return value;
  });
}

/// JSON.stringify that writes BigInt values as plain integers.
export function toJson(value) {
  const marks = [];
  const text = JSON.stringify(value, (key, v) => {
    if (typeof v === 'bigint') {
      marks.push(v.toString());
      return `\u0000big${marks.length - 1}\u0000`;
    }
    return v;
  });
  return text.replace(/"\\u0000big(\d+)\\u0000"/g, (_, i) => marks[Number(i)]);
}

async function errorFrom(res) {
  let envelope = null;
  try {
    envelope = parseJson(await res.text());
  } catch {
    envelope = null;
  }
  const ra = res.headers.get('retry-after');
  return new ApiError(res.status, envelope, ra === null ? null : Number(ra));
}

/// Calls `method path` with an optional JSON body; resolves to the parsed JSON answer.
export async function call(method, path, body, signal) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = toJson(body);
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await errorFrom(res);
  return parseJson(await res.text());
}

/// GETs `path` as a Blob (the server's bytes, unchanged).
export async function blob(path, signal) {
  const res = await fetch(path, { headers: headers(), signal });
  if (!res.ok) throw await errorFrom(res);
  return res.blob();
}

/// `GET /ready`: {ready, status, code, retryAfter}; never throws for a 503.
export async function ready() {
  const res = await fetch('/ready', { headers: headers() });
  if (res.ok) return { ready: true, status: 200 };
  const e = await errorFrom(res);
  return { ready: false, status: res.status, code: e.code, message: e.message, retryAfter: e.retryAfter };
}

/// Follows a Server-Sent Events stream; calls `onEvent(name, data)` per event (data parsed as
/// JSON when it is JSON). Resolves when the stream ends; rejects with ApiError on a refusal.
export async function events(path, onEvent, signal) {
  const res = await fetch(path, { headers: headers({ accept: 'text/event-stream' }), signal });
  if (!res.ok) throw await errorFrom(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') name = val;
        else if (field === 'data') data.push(val);
      }
      if (!data.length) continue;
      const text = data.join('\n');
      let parsed = text;
      try {
        parsed = parseJson(text);
      } catch {
        parsed = text;
      }
      onEvent(name, parsed);
    }
  }
}

function bytesOf(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/// A little-endian f32 array from base64.
export function decodeF32(b64) {
  const bytes = bytesOf(b64);
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

/// A little-endian f16 array from base64, widened to f32.
export function decodeF16(b64) {
  const bytes = bytesOf(b64);
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = halfToFloat(view.getUint16(i * 2, true));
  return out;
}
