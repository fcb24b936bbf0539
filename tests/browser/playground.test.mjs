// Drives the playground of a running `afa serve` (AFA_URL) in Debian's chromium through
// playwright-core: generate with progress, explore the maps, compare modes, a validation error
// next to its field, cancel a long job, the API key (AFA_TEST_KEY, when the server wants one),
// draining and a full queue, and the page at phone width. Screenshots of every state go to
// $ARTIFACTS. Any console error or page error fails the test, except the failed loads a step
// provokes on purpose (each step names the status and route it expects). Run it through
// scripts/browser_test.sh.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.AFA_URL;
const ARTIFACTS = process.env.ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), 'afa-browser-'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
assert.ok(BASE, 'AFA_URL must name the server, e.g. http://127.0.0.1:8080');
fs.mkdirSync(ARTIFACTS, { recursive: true });

let context;
let page;
let userDir;
const KEY = process.env.AFA_TEST_KEY || '';
const problems = [];
let allowed = null; // {status, path}: the failed load the current step provokes on purpose
let allowedSeen = 0;

async function provoking(status, pathEnd, f) {
  allowed = { status, pathEnd };
  allowedSeen = 0;
  try {
    await f();
  } finally {
    allowed = null;
  }
  return allowedSeen;
}

before(async () => {
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'afa-chromium-'));
  // A persistent context is how playwright takes a (fresh) user data dir.
  context = await chromium.launchPersistentContext(userDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run',
    ],
    viewport: { width: 1280, height: 900 },
    acceptDownloads: true,
  });
  page = context.pages()[0] || (await context.newPage());
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const line = `${msg.text()} @ ${msg.location().url}`;
    const url = msg.location().url || '';
    if (allowed && msg.text().includes(`status of ${allowed.status}`) && url.endsWith(allowed.pathEnd)) allowedSeen += 1;
    else problems.push(`console error: ${line}`);
  });
  page.on('pageerror', (err) => problems.push(`page error: ${err.stack || err.message}`));
  page.on('requestfailed', (req) => {
    const why = req.failure()?.errorText || '';
    // Streams the page closes itself (after a job ended) abort by design.
    if (!/ERR_ABORTED/.test(why)) problems.push(`request failed: ${req.url()} ${why}`);
  });
});

after(async () => {
  await context?.close();
  if (userDir) fs.rmSync(userDir, { recursive: true, force: true });
  console.log(`screenshots in ${ARTIFACTS}`);
});

const shot = (name, opts = {}) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true, ...opts });

async function api(p, init = {}) {
  const headers = KEY ? { authorization: `Bearer ${KEY}` } : {};
  const r = await fetch(new URL(p, BASE), { ...init, headers });
  return r.json();
}

test('the page loads, says the server is ready and labels the untrained ensemble', async () => {
  let res;
  if (KEY) {
    // A key-protected server: the page asks for the key, keeps it, and sends it.
    await provoking(401, '/info', async () => {
      res = await page.goto(BASE);
      await page.waitForSelector('#server-status[data-state="error"]');
      assert.match(await page.textContent('#banner'), /API key/);
      assert.ok(await page.locator('#api-key').isVisible());
      await shot('00-needs-key');
      await page.fill('#api-key', KEY);
      await page.click('#key-form button[type="submit"]');
      await page.waitForSelector('#server-status[data-state="ready"]');
    });
    assert.equal(await page.evaluate(() => localStorage.getItem('afa.apiKey')), KEY);
    await page.reload();
  } else {
    res = await page.goto(BASE);
  }
  assert.equal(res.status(), 200);
  await page.waitForSelector('#server-status[data-state="ready"]');
  await page.waitForSelector('#generate:not([disabled])');
  const info = await api('/info');
  const ens = info.ensembles.find((e) => e.name === info.default_ensemble);
  assert.equal(await page.inputValue('#model'), ens.name);
  if (ens.untrained) assert.match(await page.textContent('#model-note'), /UNTRAINED/);
  const modes = await page.$$eval('#ensemble_mode option', (os) => os.map((o) => o.value));
  assert.deepEqual(modes, ens.modes);
  assert.equal(await page.inputValue('#steps'), String(ens.defaults.steps));
  await shot('01-loaded');
});

test('generate: the progress bar moves and an image appears in the gallery', async () => {
  await page.fill('#prompt', 'a lighthouse at dusk');
  await page.fill('#steps', '24');
  await page.fill('#seed', '42');
  await page.click('#generate');
  const moving = await page.waitForFunction(() => {
    const p = document.querySelector('#jobs .job progress');
    return p && p.value > 0 && p.value < p.max ? [p.value, p.max] : null;
  }, null, { polling: 20, timeout: 60_000 });
  const [value, max] = await moving.jsonValue();
  assert.ok(value > 0 && value < max, `progress ${value}/${max}`);
  assert.match(await page.textContent('#jobs .job .job-text'), /Step \d+ \/ 24/);
  await shot('02-progress');
  await page.waitForSelector('#gallery figure.card img', { timeout: 120_000 });
  await page.waitForFunction(() => {
    const img = document.querySelector('#gallery figure.card img');
    return img && img.complete && img.naturalWidth > 0;
  });
  assert.equal(await page.textContent('#gallery figure.card .seed'), '42');
  assert.match(await page.textContent('#jobs .job[data-status="succeeded"] .job-text'), /Done/);
  // The download is the server's PNG (with its A1111 parameters chunk).
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('#gallery figure.card a[download]'),
  ]);
  const bytes = fs.readFileSync(await download.path());
  assert.equal(bytes.subarray(1, 4).toString(), 'PNG');
  assert.ok(bytes.includes(Buffer.from('parameters')), 'PNG carries the parameters chunk');
  await shot('03-result');
});

test('explorer: switching point and step changes the overlay', async () => {
  await page.click('#gallery figure.card button.explore');
  await page.waitForSelector('#explorer-body:not([hidden])', { timeout: 30_000 });
  await page.waitForFunction(() => document.querySelector('#overlay').dataset.point !== undefined);
  const overlay = () => page.$eval('#overlay', (c) => ({ url: c.toDataURL(), point: c.dataset.point, step: c.dataset.step }));
  const first = await overlay();
  const points = await page.$$eval('#unet .pt', (gs) => gs.map((g) => g.dataset.point));
  assert.ok(points.length > 1, `${points.length} aggregation points`);
  assert.deepEqual(await page.$$eval('#unet .part', (ts) => ts.map((t) => t.textContent)), ['down', 'mid', 'up']);
  assert.equal(await page.$$eval('#legend li', (l) => l.length), (await api('/info')).ensembles[0].members.length);
  await page.click(`#unet .pt[data-point="${points[points.length - 1]}"]`);
  const second = await overlay();
  assert.notEqual(second.point, first.point);
  assert.notEqual(second.url, first.url, 'another point paints another overlay');
  // Keyboard: the arrow key moves to the neighbouring point.
  await page.keyboard.press('ArrowLeft');
  const left = await overlay();
  assert.equal(left.point, points[points.length - 2]);
  await page.$eval('#step-slider', (s) => { s.value = '1'; s.dispatchEvent(new Event('input', { bubbles: true })); });
  const third = await overlay();
  assert.equal(third.step, '1');
  assert.match(await page.textContent('#step-out'), /step 1 of 24/);
  assert.notEqual(third.url, left.url, 'step 1 differs from the mean over steps');
  await page.$eval('#step-slider', (s) => { s.value = '24'; s.dispatchEvent(new Event('input', { bubbles: true })); });
  const fourth = await overlay();
  assert.notEqual(fourth.url, third.url, 'another step paints another overlay');
  const bars = await page.$$eval('#bars .bar-val', (v) => v.map((x) => Number(x.textContent)));
  assert.ok(Math.abs(bars.reduce((a, b) => a + b, 0) - 1) < 0.05, `mean weights ${bars} sum to 1`);
  await page.fill('#opacity', '100');
  await page.$eval('#opacity', (s) => s.dispatchEvent(new Event('input', { bubbles: true })));
  assert.equal(await page.$eval('#overlay', (c) => c.style.opacity), '1');
  await page.$eval('#opacity', (s) => { s.value = '60'; s.dispatchEvent(new Event('input', { bubbles: true })); });
  await shot('04-explorer');
});

test('compare: one click renders every mode side by side', async () => {
  await page.fill('#steps', '4');
  await page.click('#compare-btn');
  const modes = await page.$$eval('#ensemble_mode option', (os) => os.map((o) => o.value));
  await page.waitForFunction((n) => document.querySelectorAll('#compare .cell[data-status="succeeded"] img').length === n,
    modes.length, { timeout: 180_000 });
  const shown = await page.$$eval('#compare .cell', (cs) => cs.map((c) => c.dataset.mode));
  assert.deepEqual(shown, modes);
  const seeds = await page.$$eval('#compare .cell-status', (s) => s.map((x) => x.textContent.match(/seed (\d+)/)[1]));
  assert.equal(new Set(seeds).size, 1, 'one seed for every mode');
  await page.locator('#compare-sec').scrollIntoViewIfNeeded();
  await shot('05-compare');
});

test('a validation error from the server is shown next to its field', async () => {
  const seen = await provoking(400, '/v1/jobs', async () => {
    await page.fill('#steps', '100000');
    await page.click('#generate');
    const err = page.locator('#err-steps');
    await err.waitFor({ state: 'visible' });
    assert.match(await err.textContent(), /steps must be 1\.\.=\d+, got 100000/);
    assert.equal(await page.getAttribute('#steps', 'aria-invalid'), 'true');
    assert.ok(await page.locator('.field[data-param="steps"] #err-steps').isVisible());
    await page.locator('#steps').scrollIntoViewIfNeeded();
    await shot('06-validation');
  });
  assert.ok(seen <= 1, `one deliberate 400, saw ${seen}`);
});

test('honest states: a full queue (429 + Retry-After) and a draining server are said plainly', async () => {
  const envelope = (code, message, type) => JSON.stringify({ error: { message, type, param: null, code } });
  await provoking(429, '/v1/jobs', async () => {
    await page.route('**/v1/jobs', (r) => (r.request().method() === 'POST'
      ? r.fulfill({ status: 429, headers: { 'retry-after': '7', 'content-type': 'application/json' },
        body: envelope('queue_full', 'the queue is full; retry after 7s', 'rate_limit_error') })
      : r.continue()));
    await page.fill('#steps', '4');
    await page.click('#generate');
    await page.waitForSelector('#banner:not([hidden])');
    assert.match(await page.textContent('#banner'), /queue is full \(429\).*Retry in [1-7] s \(Retry-After\)/);
    await shot('07-queue-full', { fullPage: false });
    await page.unroute('**/v1/jobs');
  });
  await provoking(503, '/ready', async () => {
    await page.route('**/ready', (r) => r.fulfill({ status: 503, headers: { 'retry-after': '5', 'content-type': 'application/json' },
      body: envelope('draining', 'the server is shutting down; retry on another replica', 'server_error') }));
    await page.waitForSelector('#server-status:text("Draining")', { timeout: 15_000 });
    assert.match(await page.textContent('#banner'), /draining/);
    assert.ok(await page.isDisabled('#generate'));
    await shot('08-draining', { fullPage: false });
    await page.unroute('**/ready');
  });
  await page.waitForSelector('#server-status[data-state="ready"]', { timeout: 15_000 });
  assert.ok(await page.isHidden('#banner'));
});

test('cancel: a long job is really cancelled', async () => {
  const max = (await api('/info')).limits.max_steps;
  await page.fill('#steps', String(max));
  await page.click('#generate');
  const card = page.locator('#jobs .job').first();
  await page.waitForFunction(() => {
    const p = document.querySelector('#jobs .job progress');
    return p && p.value >= 2;
  }, null, { timeout: 60_000 });
  assert.ok(await page.isHidden('#err-steps'), 'the earlier field error is cleared');
  const id = await card.getAttribute('data-job');
  await card.locator('button.cancel').click();
  await page.waitForSelector('#jobs .job[data-status="cancelled"]', { timeout: 30_000 });
  assert.match(await card.locator('.job-text').textContent(), /Cancelled/);
  const view = await api(`/v1/jobs/${id}`);
  assert.equal(view.status, 'cancelled');
  await shot('09-cancelled');
});

test('phone width: the page stays readable', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.evaluate(() => window.scrollTo(0, 0));
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal scrolling (${overflow}px too wide)`);
  await shot('10-phone');
  await page.setViewportSize({ width: 1280, height: 900 });
});

test('no console errors or page errors', () => {
  assert.deepEqual(problems, []);
});
