#!/usr/bin/env node
// An Accord participant in Node.js: accord.v1.Participant (the five unary RPCs and
// Stream) on @grpc/grpc-js, with the repository's own protos (protos/accord/v1, loaded
// by relative path), its barrier in SQLite (barrier.mjs), a small bank and the
// conformance kit's operations (logic.mjs), and the standard gRPC health service.
//
//   node participants/examples/node/participant.mjs --listen 127.0.0.1:PORT --db FILE
//        [--accounts a=100,b=0] [--service NAME]
//
// Prints "listening on HOST:PORT" once serving; SIGTERM/SIGINT stop it cleanly.

import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { HealthImplementation } from "grpc-health-check";

import { BarrierStore, Code, toCall } from "./barrier.mjs";
import { bankLogic } from "./logic.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const PROTOS = path.resolve(HERE, "../../../protos");

const METHODS = {
  1: "prepare", // BRANCH_METHOD_PREPARE
  2: "commit",
  3: "abort",
  4: "execute",
  5: "compensate",
};

export function loadProtos() {
  const def = protoLoader.loadSync(["accord/v1/participant.proto"], {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: Number,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).accord.v1;
}

function response(a) {
  return { read_only: a.readOnly, message: a.message, result: a.result };
}

/** The accord.v1.Participant implementation over a BarrierStore. */
export function participantService(store) {
  const streams = new Set();
  const unary = (op) => (call, callback) => {
    const a = store.call(op, toCall(call.request));
    if (a.code === Code.OK) callback(null, response(a));
    else callback({ code: a.code, details: a.message });
  };
  function stream(call) {
    // Every call of a batch is handled synchronously (one SQLite transaction each), so
    // a batch is answered by one result batch, the ids telling which answer is which,
    // and at most one call is ever in flight (the bound the contract asks for is 1).
    streams.add(call);
    call.on("data", (batch) => {
      const results = [];
      for (const c of batch.calls || []) {
        const op = METHODS[c.method];
        if (!op) {
          results.push({
            id: c.id,
            code: Code.INVALID_ARGUMENT,
            message: `unknown method ${c.method}`,
          });
          continue;
        }
        const a = store.call(op, toCall(c.request));
        results.push({
          id: c.id,
          code: a.code,
          message: a.code === Code.OK ? "" : a.message,
          response: a.code === Code.OK ? response(a) : { message: a.message },
        });
      }
      if (results.length) call.write({ results });
    });
    call.on("end", () => {
      streams.delete(call);
      call.end();
    });
    call.on("error", () => streams.delete(call));
    call.on("cancelled", () => streams.delete(call));
  }
  return {
    impl: {
      Prepare: unary("prepare"),
      Commit: unary("commit"),
      Abort: unary("abort"),
      Execute: unary("execute"),
      Compensate: unary("compensate"),
      Stream: stream,
    },
    /** Ends every open stream (UNAVAILABLE: the coordinator reopens or retries). */
    closeStreams() {
      for (const call of streams) {
        call.destroy({ code: grpc.status.UNAVAILABLE, details: "participant is shutting down" });
      }
      streams.clear();
    },
  };
}

function parseAccounts(text) {
  if (!text) return [];
  return text.split(",").map((item) => {
    const [id, balance] = item.split("=");
    const n = Number(balance);
    if (!id || !Number.isSafeInteger(n) || n < 0) {
      throw new Error(`--accounts: expected NAME=BALANCE,..., got '${item}'`);
    }
    return [id, n];
  });
}

async function main() {
  const { values } = parseArgs({
    options: {
      listen: { type: "string", default: "127.0.0.1:0" },
      db: { type: "string" },
      accounts: { type: "string", default: "" },
      service: { type: "string", default: "accord.v1.Participant" },
    },
  });
  if (!values.db) {
    console.error("usage: participant.mjs --listen HOST:PORT --db FILE [--accounts a=100,b=0]");
    process.exit(2);
  }
  const store = new BarrierStore(values.db, bankLogic(parseAccounts(values.accounts)));
  const v1 = loadProtos();
  const server = new grpc.Server();
  const participant = participantService(store);
  server.addService(v1.Participant.service, participant.impl);
  const health = new HealthImplementation({
    "": "SERVING",
    "accord.v1.Participant": "SERVING",
    [values.service]: "SERVING",
  });
  health.addToServer(server);

  const port = await new Promise((resolve, reject) =>
    server.bindAsync(values.listen, grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  const host = values.listen.slice(0, values.listen.lastIndexOf(":"));
  const prepared = store.preparedCount();
  if (prepared) console.error(`${prepared} branch(es) held prepared from before the restart`);
  process.stdout.write(`listening on ${host}:${port}\n`);

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.error(`${signal}: stopping`);
    health.setStatus("", "NOT_SERVING");
    health.setStatus("accord.v1.Participant", "NOT_SERVING");
    participant.closeStreams();
    const done = () => {
      store.close();
      process.exit(0);
    };
    setTimeout(() => {
      server.forceShutdown();
      done();
    }, 5000).unref();
    server.tryShutdown(done);
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
