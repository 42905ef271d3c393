#!/usr/bin/env node
// An Accord client in Node.js: runs a 2PC transfer (Coordinator.Execute with two
// branches) and a saga (Coordinator.StartSaga with wait) through the coordinator, with
// the repository's own protos (protos/accord/v1, loaded by relative path), and prints
// the outcomes.
//
//   node clients/examples/node/client.mjs COORDINATOR FROM_SERVICE TO_SERVICE
//        [--from ACCOUNT] [--to ACCOUNT] [--amount N] [--saga-amount N] [--key PREFIX]
//
// Both transactions move money from FROM_SERVICE's account to TO_SERVICE's with the
// bank's operations (debit/credit, compensated by refund/uncredit), so the services
// may be Python banks, Node participants, or one of each. Prints one line per outcome:
//   2pc <gid> COMMITTED|ABORTED [reason]
//   saga <gid> COMPLETED|COMPENSATED|STUCK [step=state ...]
// Exits 0 when both calls got a final outcome (whatever it is), 1 otherwise.

import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "../../../protos");

function loadCoordinator() {
  const def = protoLoader.loadSync(["accord/v1/coordinator.proto"], {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).accord.v1;
}

function call(client, method, request, timeoutS = 30) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

const payload = (obj) => Buffer.from(JSON.stringify(obj));
const short = (state) => state.replace(/^(TXN|BRANCH)_STATE_/, "");

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      from: { type: "string", default: "a" },
      to: { type: "string", default: "b" },
      amount: { type: "string", default: "10" },
      "saga-amount": { type: "string", default: "" },
      key: { type: "string", default: `node-client-${process.pid}-${Date.now()}` },
    },
  });
  if (positionals.length !== 3) {
    console.error("usage: client.mjs COORDINATOR FROM_SERVICE TO_SERVICE [--from A] [--to B]");
    process.exit(2);
  }
  const [address, fromService, toService] = positionals;
  const amount = Number(values.amount);
  const sagaAmount = values["saga-amount"] ? Number(values["saga-amount"]) : amount;
  const v1 = loadCoordinator();
  const client = new v1.Coordinator(address, grpc.credentials.createInsecure());

  // 2PC: one transaction, a debit at one participant and a credit at the other.
  const tx = (
    await call(client, "Execute", {
      idempotency_key: `${values.key}-2pc`,
      branches: [
        {
          service: fromService,
          operation: "debit",
          payload: payload({ account: values.from, amount }),
        },
        {
          service: toService,
          operation: "credit",
          payload: payload({ account: values.to, amount }),
        },
      ],
    })
  ).transaction;
  console.log(`2pc ${tx.gid} ${short(tx.state)}${tx.reason ? ` ${tx.reason}` : ""}`);

  // Saga: debit (compensated by refund), then credit (compensated by uncredit), waited for.
  const saga = (
    await call(client, "StartSaga", {
      idempotency_key: `${values.key}-saga`,
      wait: true,
      definition: {
        steps: [
          {
            name: "take",
            service: fromService,
            action: "debit",
            compensation: "refund",
            payload: payload({ account: values.from, amount: sagaAmount }),
          },
          {
            name: "give",
            service: toService,
            action: "credit",
            compensation: "uncredit",
            payload: payload({ account: values.to, amount: sagaAmount }),
            depends_on: ["take"],
          },
        ],
      },
    })
  ).transaction;
  const steps = saga.steps.map((s) => `${s.step.name}=${short(s.state)}`).join(" ");
  console.log(`saga ${saga.gid} ${short(saga.state)} ${steps}`);
  client.close();
  const final = (s) => ["COMMITTED", "ABORTED", "COMPLETED", "COMPENSATED", "STUCK"].includes(s);
  process.exit(final(short(tx.state)) && final(short(saga.state)) ? 0 : 1);
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] : ""} ${err.details || err.message}`);
  process.exit(1);
});
