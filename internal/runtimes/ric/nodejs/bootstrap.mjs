// InvokeX runtime interface client for Node.js (18+, standard library only).
//
// The sandbox runs it as `node /var/runtime/nodejs/bootstrap.mjs`. It speaks
// Lambda's Runtime API at $AWS_LAMBDA_RUNTIME_API: during INIT it loads the
// handler named by $_HANDLER ("file.export") from $LAMBDA_TASK_ROOT, then
// loops forever fetching an event, calling the handler (async, or callback
// style) and posting the result or the error. It mirrors AWS's own Node.js
// runtime (log line format, error documents, exit codes), so code that runs
// on Lambda runs here unchanged.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import util from 'node:util';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const API_PREFIX = '/2018-06-01/runtime';
const ERROR_TYPE_HEADER = 'Lambda-Runtime-Function-Error-Type';

// Exit codes of AWS's Node.js runtime, which the agent reports as
// "Runtime exited with error: exit status N".
const EXIT_INIT_ERROR = 1;
const EXIT_UNHANDLED_REJECTION = 128;
const EXIT_UNCAUGHT_EXCEPTION = 129;

// ---------------------------------------------------------------------------
// Runtime API client

class RuntimeAPI {
  constructor(address) {
    const i = address.lastIndexOf(':');
    const port = Number(address.slice(i + 1));
    if (i <= 0 || !Number.isInteger(port)) {
      throw new Error(`AWS_LAMBDA_RUNTIME_API must be host:port, got ${JSON.stringify(address)}`);
    }
    this.host = address.slice(0, i).replace(/^\[(.*)\]$/, '$1');
    this.port = port;
    // One persistent connection: the agent serves exactly one runtime.
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  async request(method, urlPath, body, headers = {}) {
    try {
      return await this.#once(method, urlPath, body, headers);
    } catch (err) {
      // The agent may have closed the idle keep-alive connection; a fresh
      // one is tried once.
      if (err.code !== 'ECONNRESET') throw err;
      return this.#once(method, urlPath, body, headers);
    }
  }

  #once(method, urlPath, body, headers) {
    return new Promise((resolve, reject) => {
      const hdrs = { ...headers };
      if (body !== undefined) hdrs['Content-Length'] = Buffer.byteLength(body);
      const req = http.request(
        { host: this.host, port: this.port, method, path: urlPath, agent: this.agent, headers: hdrs },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  }

  async next() {
    const res = await this.request('GET', `${API_PREFIX}/invocation/next`);
    if (res.status !== 200) {
      throw new Error(`GET /invocation/next: HTTP ${res.status}: ${res.body.toString('utf8', 0, 200)}`);
    }
    return res;
  }

  postResponse(id, payload) {
    return this.#post(`${API_PREFIX}/invocation/${id}/response`, payload, { 'Content-Type': 'application/json' });
  }

  postError(id, doc) {
    return this.#post(`${API_PREFIX}/invocation/${id}/error`, JSON.stringify(doc), {
      'Content-Type': 'application/json',
      [ERROR_TYPE_HEADER]: doc.errorType,
    });
  }

  postInitError(doc) {
    return this.#post(`${API_PREFIX}/init/error`, JSON.stringify(doc), {
      'Content-Type': 'application/json',
      [ERROR_TYPE_HEADER]: doc.errorType,
    });
  }

  async #post(urlPath, body, headers) {
    const res = await this.request('POST', urlPath, body, headers);
    if (res.status >= 300) {
      // The agent refused it (e.g. 413: response too large) and has already
      // failed the invocation; the runtime carries on.
      process.stderr.write(`invokex runtime: POST ${urlPath}: HTTP ${res.status}: ${res.body.toString('utf8', 0, 200)}\n`);
    }
    return res.status;
  }
}

// ---------------------------------------------------------------------------
// Logging: console methods write Lambda's line format to stdout, tagged with
// the current request id ("undefined" during INIT, as on Lambda).

let currentRequestId;

function logLine(level, args) {
  const msg = util.format(...args);
  process.stdout.write(`${new Date().toISOString()}\t${currentRequestId}\t${level}\t${msg}\n`);
}

function patchConsole() {
  console.log = (...a) => logLine('INFO', a);
  console.info = (...a) => logLine('INFO', a);
  console.warn = (...a) => logLine('WARN', a);
  console.error = (...a) => logLine('ERROR', a);
  console.debug = (...a) => logLine('DEBUG', a);
  console.trace = (...a) => {
    const e = new Error(util.format(...a));
    e.name = 'Trace';
    Error.captureStackTrace(e, console.trace);
    logLine('TRACE', [e.stack]);
  };
}

// flush resolves once everything written to stdout and stderr so far has
// been handed to the kernel. Writes to a pipe are asynchronous in Node; the
// function's output belongs to this invocation's log, so it must reach the
// agent before the response ends the invocation.
function flush() {
  const one = (s) =>
    new Promise((resolve) => {
      if (s.destroyed || s.writableLength === 0) return resolve();
      // Writes complete in order: when this empty one is done, so is all before it.
      s.write('', () => resolve());
    });
  return Promise.all([one(process.stdout), one(process.stderr)]);
}

// ---------------------------------------------------------------------------
// Errors

class RuntimeError extends Error {
  constructor(type, message, cause) {
    super(message);
    this.name = type;
    if (cause?.stack) {
      const frames = String(cause.stack).split('\n').filter((l) => /^\s+at /.test(l));
      this.stack = [`${type}: ${message}`, ...frames].join('\n');
    }
  }
}

function isError(e) {
  return e instanceof Error || util.types.isNativeError(e);
}

function errorDoc(err) {
  if (isError(err)) {
    return {
      errorType: err.name || 'Error',
      errorMessage: err.message ?? '',
      trace: typeof err.stack === 'string' ? err.stack.split('\n') : [],
    };
  }
  return { errorType: typeof err, errorMessage: String(err), trace: [] };
}

// ---------------------------------------------------------------------------
// Loading the handler

function isESM(file) {
  if (file.endsWith('.mjs')) return true;
  if (file.endsWith('.cjs')) return false;
  // Like Node: a .js file is ESM when its nearest package.json says so.
  for (let dir = path.dirname(file); ; dir = path.dirname(dir)) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        return JSON.parse(fs.readFileSync(pj, 'utf8')).type === 'module';
      } catch {
        return false;
      }
    }
    if (dir === path.dirname(dir)) return false;
  }
}

async function importFile(file) {
  if (isESM(file)) return import(pathToFileURL(file).href);
  return createRequire(file)(file);
}

function tryResolve(req, id, opts) {
  try {
    return req.resolve(id, opts);
  } catch (e) {
    if (e.code === 'MODULE_NOT_FOUND') return undefined;
    throw e;
  }
}

async function loadModule(root, moduleRoot, moduleName) {
  const base = path.resolve(root, moduleRoot, moduleName);
  for (const ext of ['.js', '.mjs', '.cjs']) {
    if (fs.existsSync(base + ext)) return importFile(base + ext);
  }
  // As on Lambda, fall back to Node's own resolution: a directory with an
  // index file, or a package in node_modules.
  const req = createRequire(path.join(root, moduleRoot, 'noop.js'));
  const resolved =
    tryResolve(req, base) ?? tryResolve(req, moduleName, { paths: [root, path.join(root, moduleRoot)] });
  if (resolved === undefined) {
    const e = new Error(`Cannot find module '${moduleName}'`);
    e.code = 'MODULE_NOT_FOUND';
    throw e;
  }
  return importFile(resolved);
}

async function loadHandler(root, fullHandler) {
  if (fullHandler.includes('..')) {
    throw new RuntimeError('Runtime.MalformedHandlerName', "'..' is not allowed in handler name.");
  }
  const handlerString = path.basename(fullHandler);
  const moduleRoot = fullHandler.slice(0, fullHandler.length - handlerString.length);
  const match = handlerString.match(/^([^.]+)\.(.+)$/);
  if (!match) {
    throw new RuntimeError('Runtime.MalformedHandlerName', `Bad handler ${fullHandler}: must be of the form file.export`);
  }
  const [, moduleName, handlerPath] = match;

  let mod;
  try {
    mod = await loadModule(root, moduleRoot, moduleName);
  } catch (e) {
    if (e instanceof SyntaxError) {
      throw new RuntimeError('Runtime.UserCodeSyntaxError', `${e.name}: ${e.message}`, e);
    }
    if (e?.code === 'MODULE_NOT_FOUND' || e?.code === 'ERR_MODULE_NOT_FOUND') {
      throw new RuntimeError('Runtime.ImportModuleError', `Error: ${e.message}`, e);
    }
    throw e; // the module's top level threw: reported with its own type
  }

  let fn = mod;
  for (const key of handlerPath.split('.')) {
    fn = fn == null ? undefined : fn[key];
  }
  if (fn === undefined) {
    throw new RuntimeError('Runtime.HandlerNotFound', `${fullHandler} is undefined or not exported`);
  }
  if (typeof fn !== 'function') {
    throw new RuntimeError('Runtime.HandlerNotFound', `${fullHandler} is not a function`);
  }
  return fn;
}

// ---------------------------------------------------------------------------
// Invocations

function decodeJSONHeader(value) {
  // Lambda's Runtime API carries plain JSON; base64-encoded JSON (as
  // Invoke's X-Amz-Client-Context is) is accepted too.
  if (!value) return undefined;
  let text = value.trim();
  if (!text.startsWith('{')) text = Buffer.from(text, 'base64').toString('utf8');
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function makeContext(headers, requestId, settle) {
  const env = process.env;
  const deadline = Number(headers['lambda-runtime-deadline-ms'] ?? 0);
  const context = {
    // Accepted for compatibility; the response is sent as soon as the
    // handler finishes, whatever is left on the event loop.
    callbackWaitsForEmptyEventLoop: true,
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    awsRequestId: requestId,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    clientContext: decodeJSONHeader(headers['lambda-runtime-client-context']),
    identity: decodeJSONHeader(headers['lambda-runtime-cognito-identity']),
    getRemainingTimeInMillis: () => Math.max(deadline - Date.now(), 0),
    // Legacy completion methods, still honoured by Lambda.
    succeed: (result) => settle({ result }),
    fail: (err) => settle({ error: err ?? new Error('handled') }),
    done: (err, result) => (err != null ? settle({ error: err }) : settle({ result })),
  };
  return context;
}

// callHandler runs one invocation to its outcome, {result} or {error}. An
// async handler finishes when its promise settles; a handler declaring three
// parameters finishes when it calls the callback (or its promise settles,
// whichever comes first, as on Lambda); a plain synchronous handler finishes
// with its return value.
function callHandler(handler, event, headers, requestId) {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (outcome) => {
      if (!settled) {
        settled = true;
        resolve(outcome);
      }
    };
    const callback = (err, result) => (err != null ? settle({ error: err }) : settle({ result }));
    const context = makeContext(headers, requestId, settle);
    let ret;
    try {
      ret = handler(event, context, callback);
    } catch (err) {
      settle({ error: err });
      return;
    }
    if (ret && typeof ret.then === 'function') {
      ret.then(
        (result) => settle({ result }),
        (error) => settle({ error }),
      );
    } else if (handler.length < 3) {
      settle({ result: ret });
    }
  });
}

// The invocation in flight, so that a crash can be reported against it.
let current; // {id, done}
let initializing = true;
let dying = false;

async function invoke(api, handler, res) {
  const id = res.headers['lambda-runtime-aws-request-id'];
  current = { id, done: false };
  currentRequestId = id;
  const traceId = res.headers['lambda-runtime-trace-id'];
  if (traceId) process.env._X_AMZN_TRACE_ID = traceId;
  else delete process.env._X_AMZN_TRACE_ID;

  let outcome;
  try {
    // Lambda delivers {} when Invoke had no payload.
    const event = res.body.length ? JSON.parse(res.body.toString('utf8')) : {};
    outcome = await callHandler(handler, event, res.headers, id);
  } catch (err) {
    outcome = { error: new RuntimeError('Runtime.UnmarshalError', `Unable to unmarshal input: ${err.message}`) };
  }
  if (dying) {
    // A crash already reported this invocation and the process is exiting:
    // asking for the next event now would race the exit.
    return new Promise(() => {});
  }

  let payload;
  if (!('error' in outcome)) {
    try {
      payload = JSON.stringify(outcome.result === undefined ? null : outcome.result);
    } catch (err) {
      outcome = { error: new RuntimeError('Runtime.MarshalError', `Unable to stringify response body: ${err.message}`) };
    }
  }
  current.done = true;
  if ('error' in outcome) {
    const doc = errorDoc(outcome.error);
    console.error('Invoke Error \t' + JSON.stringify(doc));
    await flush();
    await api.postError(id, doc);
  } else {
    await flush();
    await api.postResponse(id, payload);
  }
}

// crash reports an error that escaped the handler (an uncaught exception or
// unhandled rejection) against the invocation in flight, or as an INIT
// error, then exits: the environment cannot be trusted any more.
async function crash(api, label, doc, code) {
  if (dying) return;
  dying = true;
  try {
    console.error(`${label} \t${JSON.stringify(doc)}`);
    await flush();
    if (initializing) {
      await api.postInitError(doc);
    } else if (current && !current.done) {
      current.done = true;
      await api.postError(current.id, doc);
    }
  } catch (err) {
    process.stderr.write(`invokex runtime: reporting ${label}: ${err.message}\n`);
  }
  await flush();
  process.exit(code);
}

async function main() {
  const address = process.env.AWS_LAMBDA_RUNTIME_API;
  if (!address) {
    process.stderr.write('invokex runtime: AWS_LAMBDA_RUNTIME_API is not set\n');
    process.exit(2);
  }
  const api = new RuntimeAPI(address);
  patchConsole();
  process.on('uncaughtException', (err) => {
    crash(api, 'Uncaught Exception', errorDoc(err), EXIT_UNCAUGHT_EXCEPTION);
  });
  process.on('unhandledRejection', (reason) => {
    const msg = isError(reason) ? `${reason.name}: ${reason.message}` : String(reason);
    const frames = isError(reason) && typeof reason.stack === 'string' ? reason.stack.split('\n') : [];
    const doc = {
      errorType: 'Runtime.UnhandledPromiseRejection',
      errorMessage: msg,
      trace: [`Runtime.UnhandledPromiseRejection: ${msg}`, ...frames],
    };
    crash(api, 'Unhandled Promise Rejection', doc, EXIT_UNHANDLED_REJECTION);
  });

  const taskRoot = process.env.LAMBDA_TASK_ROOT || '/var/task';
  let handler;
  try {
    handler = await loadHandler(taskRoot, process.env._HANDLER ?? '');
  } catch (err) {
    const doc = errorDoc(err);
    console.error('Uncaught Exception \t' + JSON.stringify(doc));
    await flush();
    await api.postInitError(doc);
    process.exit(EXIT_INIT_ERROR);
  }
  initializing = false;

  for (;;) {
    const res = await api.next();
    await invoke(api, handler, res);
  }
}

main().catch((err) => {
  // The Runtime API is gone or misbehaving: nothing left to serve.
  process.stderr.write(`invokex runtime: ${err?.stack ?? err}\n`);
  process.exitCode = 1;
  flush().then(() => process.exit(1));
});
