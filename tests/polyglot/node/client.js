#!/usr/bin/env node
// Calls tokenwire from Node.js with @grpc/grpc-js. The contract is loaded at
// run time from protos/ with @grpc/proto-loader: no generated code, so there
// is nothing to regenerate or to keep in step when the proto changes.
// Runs the scenarios listed in ../scenarios.json.
//
//   node client.js <host:port> <scenario>   one JSON line on stdout
//   node client.js golden                   hex of the golden GenerateRequest
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { performance } = require('node:perf_hooks');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const health = require('grpc-health-check');

const PROTOS = process.env.TOKENWIRE_PROTOS || path.join(__dirname, '..', '..', '..', 'protos');
// The googleapis protos that the google-proto-files package ships: google/api
// (field_behavior.proto, imported by the contract) and google/rpc (below).
const googleapis = path.dirname(require.resolve('google-proto-files/package.json'));

// camelCase fields (topP, maxTokens) as usual in JS; int64 as strings and
// enums as names, both lossless.
const definition = protoLoader.loadSync('tokenwire/v1/generation.proto', {
  includeDirs: [PROTOS, googleapis],
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const tokenwire = grpc.loadPackageDefinition(definition).tokenwire.v1;
const HealthClient = grpc.makeClientConstructor(health.service, 'grpc.health.v1.Health');

// google.rpc.Status and its details, from the googleapis protos
// (google/protobuf/* come with protobufjs).
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) => path.join(googleapis, target);
// keepCase: field names as in the .proto files (type_url, field_violations).
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');

/** The google.rpc.Status in the trailers, details unpacked, or null. */
function richStatus(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  const details = status.details.map((any) => {
    const type = rpcTypes.lookupType(any.type_url.slice(any.type_url.lastIndexOf('/') + 1));
    return { type: type.fullName.slice(1), value: type.decode(any.value) };
  });
  return { code: status.code, message: status.message, details };
}

function richError(err, report) {
  report.message = err.details;
  const status = richStatus(err);
  for (const { type, value } of status ? status.details : []) {
    if (type === 'google.rpc.ErrorInfo') {
      Object.assign(report, { reason: value.reason, domain: value.domain });
    } else if (type === 'google.rpc.ResourceInfo') {
      Object.assign(report, { resource_type: value.resource_type, resource_name: value.resource_name });
    } else if (type === 'google.rpc.BadRequest') {
      report.fields = value.field_violations.map((v) => v.field);
      report.descriptions = value.field_violations.map((v) => v.description);
    }
  }
}

/** Copies the fields of the final Token (done) into the report. */
function final(token, report) {
  if (token.done) {
    report.finish_reason = token.finishReason;
    report.completion_tokens = (token.usage && token.usage.completionTokens) || 0;
    report.model = token.model;
  }
}

/** Reads a token stream with for-await, printing tokens as they arrive. */
async function consume(call, started, report, { stopAfter = 0 } = {}) {
  report.tokens = 0;
  report.text = '';
  for await (const token of call) {
    const ms = performance.now() - started;
    process.stderr.write(`[${ms.toFixed(1).padStart(8)} ms] ${JSON.stringify(token.text || '')}\n`);
    if (report.tokens === 0) report.first_ms = ms;
    report.last_ms = ms;
    report.tokens += 1;
    report.text += token.text || '';
    final(token, report);
    if (stopAfter && report.tokens === stopAfter) call.cancel();
  }
}

const unary = (client, method, request) => new Promise((resolve, reject) => {
  client[method](request, { deadline: Date.now() + 30_000 }, (err, response) =>
    (err ? reject(err) : resolve(response)));
});

/** The x-request-id value in a grpc.Metadata, or '' when there is none. */
const requestId = (metadata) => String((metadata && metadata.get('x-request-id')[0]) || '');

async function drain(client, request, report, metadata = new grpc.Metadata()) {
  try {
    for await (const _ of client.Generate(request, metadata)); // eslint-disable-line no-unused-vars
  } catch (err) {
    report.request_id_trailer = requestId(err.metadata);
    richError(err, report);
    throw err;
  }
}

/** Reads a resumable stream across calls: its id (the first message carries only that),
 * how many chunks it has received (position + chunk_count of the last Token: what Resume's
 * after takes), and whether every Token began where the one before it ended. uint64
 * positions arrive as strings (longs: String), and as nothing when zero (defaults: false). */
class Follower {
  constructor() {
    this.streamId = '';
    this.next = 0n;
    this.contiguous = true;
    this.started = performance.now();
  }

  /** Reads up to `limit` content messages of `call` (0: to its end), printing each one's
   * position and chunk count (never its text); returns their text. Stopping early leaves
   * the call running: the caller drops it. */
  async read(call, report, limit = 0) {
    let text = '';
    let count = 0;
    for await (const token of call) {
      const position = BigInt(token.position || 0);
      const chunks = token.chunkCount || 0;
      const ms = performance.now() - this.started;
      process.stderr.write(`[${ms.toFixed(1).padStart(8)} ms] position ${position}, ${chunks} chunk(s)\n`);
      this.contiguous = this.contiguous && position === this.next;
      this.next = position + BigInt(chunks);
      if (token.streamId) {
        this.streamId = token.streamId;
        continue;
      }
      text += token.text || '';
      final(token, report);
      count += 1;
      if (limit && count === limit) break;
    }
    return text;
  }
}

/** Reads Resume(streamId) from the start to its end: the status name it ended with. */
async function resumeToEnd(client, streamId) {
  try {
    for await (const _ of client.Resume({ streamId })); // eslint-disable-line no-unused-vars
    return 'OK';
  } catch (err) {
    if (typeof err.code !== 'number') throw err;
    return grpc.status[err.code];
  }
}

/** Channel options: with TOKENWIRE_SERVICE_CONFIG (a file), the service config the
 * Python client applies by default. grpc-js resolves ipv4:ADDR,ADDR... targets itself. */
function channelOptions() {
  const file = process.env.TOKENWIRE_SERVICE_CONFIG;
  return file ? { 'grpc.service_config': fs.readFileSync(file, 'utf8') } : {};
}

const scenarios = {
  // The target lists a replica that cannot reach its engine and good ones; the service
  // config retries what failed before a token, so each call succeeds.
  retry_replicas: ['OK', async (client, report) => {
    report.texts = [];
    for (let i = 0; i < 4; i += 1) {
      let text = '';
      for await (const token of client.Generate({ model: 'tiny', prompt: 'Why is the sky blue?' })) {
        text += token.text || '';
      }
      report.texts.push(text);
    }
    report.calls_ok = report.texts.length;
  }],
  generate_stream: ['OK', async (client, report) => {
    const started = performance.now();
    const call = client.Generate({ model: 'tiny', prompt: 'Why is the sky blue?' });
    call.on('metadata', (headers) => { report.request_id_header = requestId(headers); });
    const ended = new Promise((resolve) => { call.on('status', resolve); });
    await consume(call, started, report);
    report.request_id_trailer = requestId((await ended).metadata);
  }],
  chat_history: ['OK', async (client, report) => {
    const started = performance.now();
    const call = client.Chat({
      model: 'tiny',
      messages: [
        { role: 'ROLE_SYSTEM', content: 'You answer in one short sentence.' },
        { role: 'ROLE_USER', content: 'Name a primary colour.' },
        { role: 'ROLE_ASSISTANT', content: 'Red.' },
        { role: 'ROLE_USER', content: 'Another one?' },
      ],
    });
    await consume(call, started, report);
  }],
  cancel_after_2: ['CANCELLED', async (client, report) => {
    const started = performance.now();
    const call = client.Generate({ model: 'tiny', prompt: 'Tell me a long story.' });
    await consume(call, started, report, { stopAfter: 2 });
  }],
  deadline: ['DEADLINE_EXCEEDED', async (client, report) => {
    // connect first, so that the deadline measures the call, not the connection set-up
    await new Promise((resolve, reject) => client.waitForReady(Date.now() + 30_000,
      (err) => (err ? reject(err) : resolve())));
    const started = performance.now();
    try {
      const call = client.Generate({ model: 'tiny', prompt: 'Tell me a long story.' },
        { deadline: Date.now() + 800 });
      await consume(call, started, report);
    } finally {
      report.elapsed_ms = Math.round(performance.now() - started);
    }
  }],
  not_found: ['NOT_FOUND', (client, report) => {
    const metadata = new grpc.Metadata();
    metadata.set('x-request-id', 'polyglot-node');
    return drain(client, { model: 'nope', prompt: 'p' }, report, metadata);
  }],
  invalid_argument: ['INVALID_ARGUMENT', (client, report) =>
    drain(client, { model: '', prompt: 'p', options: { topP: 2 } }, report)],
  health: ['OK', async (_client, report, target) => {
    const client = new HealthClient(target, grpc.credentials.createInsecure());
    try {
      report.status = (await unary(client, 'check', { service: '' })).status;
    } finally {
      client.close();
    }
  }],
  list_models: ['OK', async (client, report) => {
    const response = await unary(client, 'ListModels', {});
    report.models = response.models.map((m) => m.name);
    report.formats = response.models.map((m) => m.format);
  }],
  resume_after_drop: ['OK', async (client, report, target) => {
    const follower = new Follower();
    try {
      const call = client.Generate({ model: 'tiny', prompt: 'Tell me a long story.', resumable: {} });
      report.text_before = await follower.read(call, report, 3);
      Object.assign(report, { stream_id: follower.streamId, after: Number(follower.next) });
      if (!follower.streamId) throw new Error('the first message of a resumable stream carried no stream_id');
      // Drop the call: cancel it and close its channel. The server detaches; the model goes on.
      call.cancel();
      client.close();
      const again = new tokenwire.GenerationService(target, grpc.credentials.createInsecure());
      try {
        report.text_after = await follower.read(
          again.Resume({ streamId: follower.streamId, after: String(follower.next) }), report);
      } finally {
        again.close();
      }
    } finally {
      Object.assign(report, { positions_contiguous: follower.contiguous, chunks: Number(follower.next) });
    }
  }],
  start_and_cancel: ['OK', async (client, report) => {
    const generate = { model: 'tiny', prompt: 'Tell me a long story.' };
    const streamId = (await unary(client, 'Start', { generate })).streamId;
    report.stream_id = streamId;
    report.stopped = Boolean((await unary(client, 'Cancel', { streamId })).stopped);
    report.resume_code = await resumeToEnd(client, streamId);
    report.stopped_again = Boolean((await unary(client, 'Cancel', { streamId })).stopped);
    report.unknown_code = await resumeToEnd(client, 'A'.repeat(24));
  }],
};

/** A plain JS value as google.protobuf.Value (what structpb.NewValue does in Go). */
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case 'string': return { stringValue: v };
    case 'number': return { numberValue: v };
    case 'boolean': return { boolValue: v };
    default: return { structValue: toStruct(v) };
  }
}

/** A plain object as google.protobuf.Struct. Keys are sorted: protobufjs
 * writes map entries in insertion order, so sorting is what makes the bytes
 * deterministic (as Go's and Java's deterministic modes do). */
function toStruct(obj) {
  const fields = {};
  for (const key of Object.keys(obj).sort()) fields[key] = toValue(obj[key]);
  return { fields };
}

/** ../golden_request.json, built as a plain object (proto-loader's builder). */
function goldenRequest() {
  return {
    model: 'smollm2:135m',
    prompt: 'Why is the sky blue? Réponds en une ligne ✨',
    system: 'Answer in one line.',
    options: {
      temperature: 0, // explicit zero: present on the wire
      topP: 0.9,
      topK: 40,
      maxTokens: -1,
      stop: ['\n\n', 'User:'],
      seed: '-42',
      repeatPenalty: 1.1,
      presencePenalty: -0.5,
      numCtx: 8192,
    },
    format: { jsonSchema: toStruct({ properties: { answer: { enum: ['yes', 'no', 42.5, true, null] } } }) },
    keepAlive: { seconds: '90', nanos: 500_000_000 },
    images: [Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0xff])],
    think: 'THINK_LOW',
    // suffix: '' and raw: false are left out, unlike in the other languages:
    // protobufjs writes a proto3 scalar that is set explicitly even when it
    // holds the default, so they would add bytes 4a00 and 5000 (harmless to
    // readers, but not the canonical encoding the golden test compares).
  };
}

async function main(argv) {
  if (argv.length === 1 && argv[0] === 'golden') {
    const serialize = definition['tokenwire.v1.GenerationService'].Generate.requestSerialize;
    process.stdout.write(`${serialize(goldenRequest()).toString('hex')}\n`);
    return;
  }
  if (argv.length !== 2) {
    process.stderr.write('usage: client.js <host:port> <scenario> | client.js golden\n');
    process.exitCode = 2;
    return;
  }
  const [target, name] = argv;
  if (!(name in scenarios)) throw new Error(`unknown scenario ${JSON.stringify(name)}`);
  const [expect, run] = scenarios[name];
  const client = new tokenwire.GenerationService(target, grpc.credentials.createInsecure(),
    channelOptions());
  const report = { scenario: name, lang: 'node' };
  let code = 'OK';
  try {
    await run(client, report, target);
  } catch (err) {
    if (typeof err.code !== 'number') throw err;
    code = grpc.status[err.code];
  }
  Object.assign(report, { code, ok: code === expect });
  process.stdout.write(`${JSON.stringify(report)}\n`);
  if (process.env.TOKENWIRE_POLYGLOT_HOLD === '1') {
    // keep the channel open until stdin closes
    await new Promise((resolve) => process.stdin.on('end', resolve).resume());
  }
  client.close();
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`polyglot-node: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
