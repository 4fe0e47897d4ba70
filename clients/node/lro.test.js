// longrun's jobs through Google's own long-running-operation client for Node.js (google-gax,
// what every Google Cloud Node library uses): its OperationsClient and its Operation poller,
// which knows nothing of longrun beyond the google.longrunning.Operations contract and the
// longrun.v1.Job message the operation's metadata and response carry.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const gax = require('google-gax');

const { REPO, startServer, stopServer } = require('./harness');

const CALL_TIMEOUT_MS = 10_000;
const JOB_TYPE_URL = 'type.googleapis.com/longrun.v1.Job';

// The Job message as protobufjs decodes it out of an Any (the poller's decoders).
const Job = gax.protobuf
  .loadSync(path.join(REPO, 'proto', 'longrun', 'v1', 'jobs.proto'))
  .lookupType('longrun.v1.Job');
const decodeJob = (bytes) => Job.toObject(Job.decode(bytes), { enums: String, longs: Number });

let server;
let jobs; // longrun.v1.Jobs over grpc-js, to submit
let operations; // google-gax's OperationsClient

function submit(actions) {
  return new Promise((resolve, reject) => {
    jobs.Submit({ actions }, { deadline: new Date(Date.now() + CALL_TIMEOUT_MS) }, (err, res) =>
      err ? reject(err) : resolve(res.job));
  });
}

const sleepAction = (durationMs, steps) => ({
  name: 'sleep',
  params: {
    fields: { duration_ms: { numberValue: durationMs }, steps: { numberValue: steps } },
  },
});

before(async () => {
  server = await startServer();
  const definition = protoLoader.loadSync('longrun/v1/jobs.proto', {
    includeDirs: [path.join(REPO, 'proto')],
    keepCase: true,
    defaults: true,
  });
  const { longrun } = grpc.loadPackageDefinition(definition);
  jobs = new longrun.v1.Jobs(server.addr, grpc.credentials.createInsecure());
  const [host, port] = server.addr.split(':');
  // Plaintext to a local server: no Google credentials are looked for.
  operations = gax.lro({ grpc }).operationsClient({
    servicePath: host,
    port: Number(port),
    sslCreds: grpc.credentials.createInsecure(),
  });
});

after(async () => {
  if (jobs) jobs.close();
  if (operations) await operations.close();
  await stopServer(server && server.child);
});

test("gax's Operation poller follows a job to its end, with its progress as metadata", async () => {
  const job = await submit([sleepAction(900, 3)]);
  const [op] = await operations.getOperation({ name: `operations/${job.id}` }, { timeout: CALL_TIMEOUT_MS });
  assert.equal(op.name, `operations/${job.id}`);
  assert.equal(op.metadata.type_url, JOB_TYPE_URL);

  const descriptor = new gax.LongrunningDescriptor(operations, decodeJob, decodeJob);
  const backoff = gax.createBackoffSettings(50, 1.5, 300, null, null, null, 20_000);
  const operation = new gax.Operation(op, descriptor, backoff);
  const percents = [];
  operation.on('progress', (metadata) => percents.push(metadata.progress.percent));
  const [response, metadata, final] = await operation.promise();

  assert.equal(final.done, true);
  assert.equal(final.response.type_url, JOB_TYPE_URL);
  assert.equal(metadata.state, 'JOB_STATE_SUCCEEDED');
  assert.equal(response.id, job.id);
  assert.equal(response.actions[0].result.structValue.fields.steps.numberValue, 3);
  assert.ok(percents.length > 0, 'the poller reported progress while the job ran');
  assert.deepEqual(percents, [...percents].sort((a, b) => a - b), `progress rises: ${percents}`);
});

test("gax's cancelOperation stops a running job, whose operation then ends CANCELLED", async () => {
  const job = await submit([sleepAction(60_000, 600)]);
  const name = `operations/${job.id}`;
  await operations.cancelOperation({ name }, { timeout: CALL_TIMEOUT_MS });

  const descriptor = new gax.LongrunningDescriptor(operations, decodeJob, decodeJob);
  const backoff = gax.createBackoffSettings(50, 1.5, 300, null, null, null, 20_000);
  const [op] = await operations.getOperation({ name }, { timeout: CALL_TIMEOUT_MS });
  const operation = new gax.Operation(op, descriptor, backoff);
  await assert.rejects(operation.promise(), (err) => {
    assert.equal(err.code, grpc.status.CANCELLED, `${err}`);
    return true;
  });
  const [ended] = await operations.getOperation({ name }, { timeout: CALL_TIMEOUT_MS });
  assert.equal(ended.done, true);
  assert.equal(ended.error.code, grpc.status.CANCELLED);
  assert.equal(decodeJob(ended.metadata.value).state, 'JOB_STATE_CANCELLED');
});
