// Shared by the Node tests: the longrun server binary (target/debug/longrun, or $LONGRUN_BIN)
// started on a free loopback port with the in-memory store, and stopped. Every wait is bounded.
'use strict';

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..');
const BINARY = process.env.LONGRUN_BIN || path.join(REPO, 'target', 'debug', 'longrun');
const START_TIMEOUT_MS = 30_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.setTimeout(500);
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => resolve(false));
    sock.once('timeout', () => { sock.destroy(); resolve(false); });
  });
}

// Starts `longrun serve` with `extraArgs`; resolves with { child, addr, log() } once it
// accepts connections. The port is picked free, then handed over: a server that exits at once
// (another process took it) is tried again on a new one.
async function startServer(extraArgs = []) {
  assert.ok(fs.existsSync(BINARY), `server binary ${BINARY} not found: run \`cargo build\` first`);
  let log = '';
  for (let tries = 0; tries < 3; tries++) {
    const port = await freePort();
    const addr = `127.0.0.1:${port}`;
    const child = spawn(BINARY, ['serve', '--listen', addr, '--store', 'memory', ...extraArgs], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let exited = false;
    child.once('exit', () => { exited = true; });
    child.stdout.on('data', (d) => { log += d; });
    child.stderr.on('data', (d) => { log += d; });
    const until = Date.now() + START_TIMEOUT_MS;
    while (!exited && Date.now() < until) {
      if (await canConnect(port)) return { child, addr, log: () => log };
      await sleep(50);
    }
    await stopServer(child);
  }
  throw new Error(`longrun server did not start; log:\n${log}`);
}

async function stopServer(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

module.exports = { REPO, BINARY, sleep, freePort, startServer, stopServer };
