// longrun from a real browser: a page served from one origin calls the server, on another,
// with fetch() — the Connect protocol's unary JSON calls and a server stream, and a gRPC-Web
// call — as a web app does. The server lists the page's origin (--cors-allow-origin), so the
// browser's CORS checks pass; a page from an origin it does not list is kept from the answers.
// Headless Debian Chromium (/usr/bin/chromium, or $CHROMIUM), driven by playwright-core;
// .ci/run installs it. Without it the test says so and skips.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');

const { freePort, startServer, stopServer } = require('./harness');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PAGE_TIMEOUT_MS = 30_000;

// A page server on 127.0.0.1:<port>: its own origin, different from the server's by port.
async function servePage() {
  const port = await freePort();
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>longrun from a browser</title>');
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return { server, origin: `http://127.0.0.1:${port}` };
}

let browser;
let longrun;
let allowed;
let stranger;

before(async () => {
  if (!fs.existsSync(CHROMIUM)) return;
  allowed = await servePage();
  stranger = await servePage();
  longrun = await startServer(['--cors-allow-origin', allowed.origin]);
  const { chromium } = require('playwright-core');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // As root in a container, Chromium's sandbox cannot start.
    args: ['--no-sandbox'],
    timeout: PAGE_TIMEOUT_MS,
  });
});

after(async () => {
  if (browser) await browser.close();
  if (longrun) await stopServer(longrun.child);
  for (const page of [allowed, stranger]) if (page) page.server.close();
});

// Runs `fn(args)` in a page loaded from `origin`, as that page's own script.
async function inPage(origin, fn, args) {
  const page = await browser.newPage();
  try {
    page.setDefaultTimeout(PAGE_TIMEOUT_MS);
    await page.goto(origin);
    return await page.evaluate(fn, args);
  } finally {
    await page.close();
  }
}

// The page's script: Submit (with wait) in Connect JSON, a refused GetStatus, a WatchJob stream
// read to its end, and a gRPC-Web ListActions. Each result is what the page's script could
// read, or the error fetch() threw.
async function webApp({ base }) {
  const connectJson = { 'content-type': 'application/json', 'connect-protocol-version': '1' };
  const attempt = async (call) => {
    try {
      return await call();
    } catch (error) {
      return { thrown: String(error) };
    }
  };
  const submit = await attempt(async () => {
    const response = await fetch(`${base}/longrun.v1.Jobs/Submit`, {
      method: 'POST',
      headers: { ...connectJson, traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' },
      body: JSON.stringify({
        actions: [{ name: 'sleep', params: { duration_ms: 300, steps: 3 } }],
        labels: { from: 'browser' },
      }),
    });
    return { status: response.status, body: await response.json() };
  });
  const refused = await attempt(async () => {
    const response = await fetch(`${base}/longrun.v1.Jobs/GetStatus`, {
      method: 'POST',
      headers: connectJson,
      body: JSON.stringify({ job_id: 'nope' }),
    });
    return { status: response.status, body: await response.json() };
  });
  const watched = await attempt(async () => {
    const id = submit.body.job.id;
    const request = new TextEncoder().encode(JSON.stringify({ job_id: id }));
    const envelope = new Uint8Array(5 + request.length);
    new DataView(envelope.buffer).setUint32(1, request.length);
    envelope.set(request, 5);
    const response = await fetch(`${base}/longrun.v1.Jobs/WatchJob`, {
      method: 'POST',
      headers: { 'content-type': 'application/connect+json', 'connect-protocol-version': '1' },
      body: envelope,
    });
    const bytes = new Uint8Array(await response.arrayBuffer());
    const messages = [];
    for (let at = 0; at + 5 <= bytes.length;) {
      const flags = bytes[at];
      const length = new DataView(bytes.buffer, at + 1, 4).getUint32(0);
      const message = JSON.parse(new TextDecoder().decode(bytes.slice(at + 5, at + 5 + length)));
      messages.push({ end: (flags & 2) === 2, message });
      at += 5 + length;
    }
    return { status: response.status, messages };
  });
  const grpcWeb = await attempt(async () => {
    const response = await fetch(`${base}/longrun.v1.Jobs/ListActions`, {
      method: 'POST',
      headers: { 'content-type': 'application/grpc-web+proto', 'x-grpc-web': '1' },
      body: new Uint8Array([0, 0, 0, 0, 0]),
    });
    const body = new Uint8Array(await response.arrayBuffer());
    // The last frame holds the trailers (flag 0x80), as text.
    const text = new TextDecoder().decode(body);
    return { status: response.status, bytes: body.length, trailers: text.slice(text.indexOf('grpc-status')) };
  });
  return { submit, refused, watched, grpcWeb };
}

test('a page on a listed origin calls longrun with fetch(): Connect unary and stream, gRPC-Web', async (t) => {
  if (!browser) return t.skip(`no Chromium at ${CHROMIUM} (.ci/run installs it)`);
  const result = await inPage(allowed.origin, webApp, { base: `http://${longrun.addr}` });

  assert.equal(result.submit.status, 200, JSON.stringify(result.submit));
  const job = result.submit.body.job;
  assert.equal(job.labels.from, 'browser');

  assert.equal(result.refused.status, 400, JSON.stringify(result.refused));
  assert.equal(result.refused.body.code, 'invalid_argument');

  assert.equal(result.watched.status, 200, JSON.stringify(result.watched));
  const messages = result.watched.messages;
  const end = messages.at(-1);
  assert.ok(end.end && !end.message.error, `a clean end of stream: ${JSON.stringify(end)}`);
  const states = messages.filter((m) => !m.end).map((m) => m.message.job.state);
  assert.equal(states.at(-1), 'JOB_STATE_SUCCEEDED', states.join(' '));
  const versions = messages.filter((m) => !m.end).map((m) => Number(m.message.job.version));
  for (let i = 1; i < versions.length; i++) assert.ok(versions[i] > versions[i - 1], `${versions}`);

  assert.equal(result.grpcWeb.status, 200, JSON.stringify(result.grpcWeb));
  assert.ok(result.grpcWeb.bytes > 5, 'a message and its trailers');
  assert.match(result.grpcWeb.trailers, /grpc-status:\s*0/);
});

test('a page on an origin the server does not list cannot read its answers', async (t) => {
  if (!browser) return t.skip(`no Chromium at ${CHROMIUM} (.ci/run installs it)`);
  const result = await inPage(stranger.origin, webApp, { base: `http://${longrun.addr}` });
  // The preflight is not approved, so fetch() fails before any call is made.
  assert.match(result.submit.thrown || '', /TypeError/, JSON.stringify(result.submit));
  assert.match(result.refused.thrown || '', /TypeError/, JSON.stringify(result.refused));
  assert.match(result.grpcWeb.thrown || '', /TypeError/, JSON.stringify(result.grpcWeb));
});
