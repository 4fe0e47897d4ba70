// longrun.v1.Jobs from Node.js: @grpc/grpc-js with @grpc/proto-loader reading proto/ at run time.
// Starts the server binary itself (target/debug/longrun, or $LONGRUN_BIN) on a free loopback
// port with the in-memory store. Every call has a deadline; every wait is bounded.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { REPO, startServer, stopServer } = require('./harness');

const CALL_TIMEOUT_MS = 10_000;
const STREAM_TIMEOUT_MS = 30_000;

// proto-loader (protobufjs) carries google/protobuf/{duration,struct,timestamp,...}.proto
// itself, so proto/ is the only include dir needed.
const packageDefinition = protoLoader.loadSync('longrun/v1/jobs.proto', {
  includeDirs: [path.join(REPO, 'proto')],
  keepCase: true, // field names as in the .proto: job_id, after_version
  longs: Number, // int64 versions as numbers (they stay far below 2^53)
  enums: String, // 'JOB_STATE_RUNNING'
  defaults: true,
  oneofs: true,
});
const { longrun } = grpc.loadPackageDefinition(packageDefinition);

// google.protobuf.Struct from a plain object. The well-known types keep protobufjs's own
// camelCase field names (numberValue, not number_value) even with keepCase.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}

const deadline = (ms) => new Date(Date.now() + ms);

let server; // the child process
let client;
let serverAddr;

function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(CALL_TIMEOUT_MS) }, (err, res) =>
      err ? reject(err) : resolve(res));
  });
}

async function submit(name, params) {
  const res = await unary('Submit', { actions: [{ name, params: toStruct(params) }] });
  return res.job;
}

// Reads a WatchJob stream; `onJob` may return true to stop reading (the call is cancelled).
// Resolves with the snapshots seen, once the server closes the stream or onJob stops it.
function watch(request, onJob = () => false) {
  return new Promise((resolve, reject) => {
    const seen = [];
    let stopped = false;
    const call = client.WatchJob(request, { deadline: deadline(STREAM_TIMEOUT_MS) });
    call.on('data', (res) => {
      if (stopped) return;
      seen.push(res.job);
      if (onJob(res.job)) {
        stopped = true;
        call.cancel();
        resolve({ seen, call });
      }
    });
    call.on('error', (err) => {
      if (!stopped) reject(err);
    });
    call.on('end', () => {
      if (!stopped) resolve({ seen, call });
    });
  });
}

function assertVersionsRise(jobs) {
  const versions = jobs.map((j) => j.version);
  for (let i = 1; i < versions.length; i++) {
    assert.ok(versions[i] > versions[i - 1], `versions must strictly rise: ${versions}`);
  }
}

before(async () => {
  const started = await startServer();
  server = started.child;
  serverAddr = started.addr;
  client = new longrun.v1.Jobs(serverAddr, grpc.credentials.createInsecure());
});

after(async () => {
  if (client) client.close();
  await stopServer(server);
});

test('ListActions lists the built-in actions', async () => {
  const res = await unary('ListActions', {});
  const names = res.actions.map((a) => a.name);
  for (const n of ['sleep', 'echo', 'fail', 'sha256']) assert.ok(names.includes(n), `${n} in ${names}`);
});

test('submit, then watch to the end: QUEUED, RUNNING, SUCCEEDED with rising versions', async () => {
  const job = await submit('sleep', { duration_ms: 1200, steps: 4 });
  assert.match(job.id, /^[0-9a-f-]{36}$/);
  assert.equal(job.state, 'JOB_STATE_QUEUED');
  assert.equal(job.version, 1);

  const { seen: stream } = await watch({ job_id: job.id });
  // The stream opens with the current snapshot: the Submit response again (version 1) if the
  // job has not started yet, a later version otherwise.
  assert.ok(stream.length > 0 && stream[0].version >= job.version);
  const seen = stream[0].version > job.version ? [job, ...stream] : stream;
  assertVersionsRise(seen);
  const states = seen.map((j) => j.state);
  assert.equal(states.at(-1), 'JOB_STATE_SUCCEEDED', `${states}`);
  const firstRunning = states.indexOf('JOB_STATE_RUNNING');
  assert.ok(firstRunning > 0, `RUNNING seen after QUEUED: ${states}`);
  assert.deepEqual(new Set(states.slice(firstRunning, -1)), new Set(['JOB_STATE_RUNNING']));

  const last = stream.at(-1);
  assert.equal(last.progress.percent, 100);
  assert.equal(last.actions[0].state, 'ACTION_STATE_SUCCEEDED');
  assert.equal(last.actions[0].result.structValue.fields.steps.numberValue, 4);
});

test('a job scheduled a second ahead is QUEUED until then and starts no earlier', async () => {
  const dueMs = Date.now() + 1000;
  const scheduleTime = { seconds: Math.floor(dueMs / 1000), nanos: (dueMs % 1000) * 1e6 };
  const res = await unary('Submit', {
    actions: [{ name: 'echo', params: toStruct({}) }],
    schedule_time: scheduleTime,
  });
  assert.equal(res.job.state, 'JOB_STATE_QUEUED');
  assert.deepEqual(res.job.schedule_time, scheduleTime);

  const { seen } = await watch({ job_id: res.job.id });
  const last = seen.at(-1);
  assert.equal(last.state, 'JOB_STATE_SUCCEEDED', `${seen.map((j) => j.state)}`);
  const started = last.start_time.seconds * 1000 + last.start_time.nanos / 1e6;
  assert.ok(started >= dueMs, `started at ${started}, due at ${dueMs}`);
  assert.deepEqual(last.schedule_time, scheduleTime);
});

test('cancel a running sleep job: the stream ends CANCELLED', async () => {
  const job = await submit('sleep', { duration_ms: 60_000, steps: 600 });
  const started = Date.now();
  const seen = [];
  let cancelSent = false;
  const { seen: all } = await watch({ job_id: job.id }, (j) => {
    seen.push(j);
    if (j.state === 'JOB_STATE_RUNNING' && !cancelSent) {
      cancelSent = true;
      unary('Cancel', { job_id: job.id }).catch((err) => { seen.push(err); });
    }
    return false; // read on to the end of the stream
  });
  assert.ok(cancelSent, 'the job was seen RUNNING');
  assert.ok(seen.every((j) => !(j instanceof Error)), `Cancel failed: ${seen.filter((j) => j instanceof Error)}`);
  assertVersionsRise(all);
  const last = all.at(-1);
  assert.equal(last.state, 'JOB_STATE_CANCELLED', `${all.map((j) => j.state)}`);
  assert.equal(last.actions[0].state, 'ACTION_STATE_CANCELLED');
  assert.ok(Date.now() - started < 20_000, 'cancel reached the running handler');
});

test('resume a watch with after_version: nothing repeated, nothing missed', async () => {
  const job = await submit('sleep', { duration_ms: 1500, steps: 5 });
  const { seen: first } = await watch({ job_id: job.id }, () => true); // one message, then drop
  const lastSeen = first.at(-1).version;

  const { seen: resumed } = await watch({ job_id: job.id, after_version: lastSeen });
  assert.ok(resumed.length > 0);
  assert.ok(resumed[0].version > lastSeen, `${resumed[0].version} > ${lastSeen}`);
  assertVersionsRise(resumed);
  assert.equal(resumed.at(-1).state, 'JOB_STATE_SUCCEEDED');
});

// Reads a WatchJobs stream until `enough(messages)` says so, then cancels it.
function watchJobs(request, enough) {
  return new Promise((resolve, reject) => {
    const messages = [];
    let stopped = false;
    const call = client.WatchJobs(request, { deadline: deadline(STREAM_TIMEOUT_MS) });
    call.on('data', (res) => {
      if (stopped) return;
      messages.push(res);
      if (enough(messages)) {
        stopped = true;
        call.cancel();
        resolve(messages);
      }
    });
    call.on('error', (err) => {
      if (!stopped) reject(err);
    });
    call.on('end', () => {
      if (!stopped) reject(new Error('a WatchJobs stream does not end by itself'));
    });
  });
}

test('WatchJobs: one stream for a labelled batch, resumed from its cursor with nothing missed', async () => {
  const label = `node-${Date.now()}`;
  const submitLabelled = async () =>
    (await unary('Submit', {
      actions: [{ name: 'sleep', params: toStruct({ duration_ms: 600, steps: 3 }) }],
      labels: { batch: label },
    })).job;
  const first = await submitLabelled();
  await submit('echo', { message: 'not in the batch' });
  // Two messages, then the connection is dropped.
  const before = await watchJobs({ labels: { batch: label } }, (m) => m.length === 2);
  const cursor = before.at(-1).cursor;
  assert.ok(cursor.length > 0);

  const second = await submitLabelled();
  const ended = new Set();
  const after = await watchJobs({ labels: { batch: label }, after_cursor: cursor }, (m) => {
    const job = m.at(-1).job;
    if (job.state === 'JOB_STATE_SUCCEEDED') ended.add(job.id);
    return ended.size === 2;
  });
  assert.deepEqual([...ended].sort(), [first.id, second.id].sort());
  const byJob = new Map();
  for (const { job } of [...before, ...after]) {
    assert.equal(job.labels.batch, label, 'only the batch');
    byJob.set(job.id, [...(byJob.get(job.id) || []), job]);
  }
  for (const jobs of byJob.values()) assertVersionsRise(jobs);
  const states = byJob.get(second.id).map((j) => j.state);
  assert.ok(states.includes('JOB_STATE_RUNNING'), `the resume replays what it missed: ${states}`);
});

test('a bad request is INVALID_ARGUMENT naming the field', async () => {
  await assert.rejects(submit('sleep', { steps: 0 }), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /actions\[0\]\.params\.steps/);
    // The encoded google.rpc.Status, with its google.rpc.BadRequest detail, rides in this
    // trailer (decode it with the googleapis protos if you need more than the field's name).
    const details = err.metadata.get('grpc-status-details-bin');
    assert.equal(details.length, 1);
    assert.ok(details[0].includes('type.googleapis.com/google.rpc.BadRequest'));
    assert.ok(details[0].includes('actions[0].params.steps'));
    return true;
  });
});

test('a client that compresses its requests (gzip, deflate) is served like any other', async () => {
  // grpc-js's compression algorithms: 1 is deflate, 2 is gzip.
  for (const algorithm of [2, 1]) {
    const compressing = new longrun.v1.Jobs(
      serverAddr,
      grpc.credentials.createInsecure(),
      { 'grpc.default_compression_algorithm': algorithm },
    );
    try {
      const message = 'x'.repeat(4096);
      const res = await new Promise((resolve, reject) => {
        compressing.Submit(
          {
            actions: [{ name: 'echo', params: toStruct({ message }) }],
            wait: { seconds: 10 },
          },
          { deadline: deadline(CALL_TIMEOUT_MS) },
          (err, r) => (err ? reject(err) : resolve(r)),
        );
      });
      assert.equal(res.job.state, 'JOB_STATE_SUCCEEDED', `algorithm ${algorithm}`);
      const echoed = res.job.actions[0].result.structValue.fields.params.structValue.fields.message;
      assert.equal(echoed.stringValue, message);
    } finally {
      compressing.close();
    }
  }
});

// `buf curl` with its default protocol, Connect (the schema read through reflection over
// Connect too), as a user who never heard of `--protocol grpc` runs it.
const BUF = path.join(__dirname, 'node_modules', '.bin', 'buf');

function bufCurl(method, body) {
  const args = ['curl', `http://${serverAddr}/longrun.v1.Jobs/${method}`];
  if (body !== undefined) args.push('-d', JSON.stringify(body));
  return new Promise((resolve) => {
    execFile(BUF, args, { timeout: STREAM_TIMEOUT_MS }, (err, stdout, stderr) =>
      resolve({ code: err ? err.code : 0, stdout, stderr }));
  });
}

test('buf curl with its default protocol (Connect): unary calls, a stream, an error', async () => {
  const listed = await bufCurl('ListActions');
  assert.equal(listed.code, 0, listed.stderr);
  assert.ok(JSON.parse(listed.stdout).actions.some((a) => a.name === 'echo'), listed.stdout);

  const submitted = await bufCurl('Submit', {
    actions: [{ name: 'sleep', params: { duration_ms: 300, steps: 3 } }],
  });
  assert.equal(submitted.code, 0, submitted.stderr);
  const { job } = JSON.parse(submitted.stdout);
  assert.equal(job.state, 'JOB_STATE_QUEUED');

  // A server stream: buf curl prints each message as a JSON object, one after another.
  const watched = await bufCurl('WatchJob', { job_id: job.id });
  assert.equal(watched.code, 0, watched.stderr);
  const states = [...watched.stdout.matchAll(/^ {4}"state": "(JOB_STATE_\w+)"/gm)].map((m) => m[1]);
  assert.equal(states.at(-1), 'JOB_STATE_SUCCEEDED', watched.stdout);

  const bad = await bufCurl('GetStatus', { job_id: 'nope' });
  assert.notEqual(bad.code, 0);
  assert.match(bad.stdout + bad.stderr, /invalid_argument/);
  assert.match(bad.stdout + bad.stderr, /job_id/);
});
