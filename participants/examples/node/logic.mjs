// The business logic: a small bank with the Python bank's operation names and payloads
// (participants/bank/_logic.py), so one transaction can mix both, and the conformance
// kit's operations (conformance.add, conformance.get).
//
// Bank, payload {"account": A, "amount": N}:
//   2PC   debit: Prepare holds N (refused "insufficient funds" when the available
//         balance is short), Commit applies it, Abort releases it.
//         credit: Prepare checks the account, Commit adds N.
//         balance (payload {"account"}): a read-only vote.
//   saga  Execute debit takes N at once / Compensate refund gives it back.
//         Execute credit adds N / Compensate uncredit takes it back ("not yet" when it
//         has been spent meanwhile).
// Conformance, payload {"key": K, "amount": N, "vote": "yes"|"no"|"read-only"} (vote
// default "yes"; a payload that does not decode is refused, ABORTED):
//   conformance.add: Prepare stages +N (kept in the prepared branch's row; "no" refuses,
//   "read-only" votes read-only and changes nothing), Commit applies, Abort drops; a
//   one-phase Commit applies at once; Execute applies +N ("no" refuses), Compensate -N.
//   conformance.get {"key": K}: Execute answers {"key": K, "value": committed value}.

import { NotYet, Refuse } from "./barrier.mjs";

const MAX_AMOUNT = 2 ** 53;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS accounts (
    id      TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    held    INTEGER NOT NULL DEFAULT 0,
    CHECK (held >= 0 AND held <= balance)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq           INTEGER PRIMARY KEY,
    gid           TEXT NOT NULL,
    branch_id     TEXT NOT NULL,
    account       TEXT NOT NULL REFERENCES accounts (id),
    delta         INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    UNIQUE (gid, branch_id)
);
CREATE TABLE IF NOT EXISTS counters (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
`;

function json(call) {
  let data;
  try {
    data = JSON.parse(call.payload.toString("utf8"));
  } catch (err) {
    throw new Refuse(`bad payload for ${call.operation}: not JSON (${err.message})`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new Refuse(`bad payload for ${call.operation}: expected a JSON object`);
  }
  return data;
}

function movement(call, { amount = true } = {}) {
  const data = json(call);
  const account = data.account;
  if (typeof account !== "string" || !account) {
    throw new Refuse(`bad payload for ${call.operation}: 'account' must be a non-empty string`);
  }
  if (!amount) return { account, amount: 0 };
  const value = data.amount;
  if (!Number.isSafeInteger(value) || value <= 0 || value > MAX_AMOUNT) {
    throw new Refuse(
      `bad payload for ${call.operation}: 'amount' must be an integer in 1..${MAX_AMOUNT}`,
    );
  }
  return { account, amount: value };
}

function counterArgs(call, { amount = true } = {}) {
  const data = json(call);
  const key = data.key;
  if (typeof key !== "string" || !key) {
    throw new Refuse(`bad payload for ${call.operation}: 'key' must be a non-empty string`);
  }
  if (!amount) return { key };
  const value = data.amount;
  if (!Number.isSafeInteger(value) || Math.abs(value) > MAX_AMOUNT) {
    throw new Refuse(
      `bad payload for ${call.operation}: 'amount' must be an integer in` +
        ` -${MAX_AMOUNT}..${MAX_AMOUNT}`,
    );
  }
  const vote = data.vote === undefined ? "yes" : data.vote;
  if (!["yes", "no", "read-only"].includes(vote)) {
    throw new Refuse(`bad payload for ${call.operation}: 'vote' must be yes, no or read-only`);
  }
  return { key, amount: value, vote };
}

export function bankLogic(seed = []) {
  let st;
  const q = (sql) => st.prepare(sql);

  function account(db, id) {
    const row = db.prepare("SELECT balance, held FROM accounts WHERE id = ?").get(id);
    if (!row) throw new Refuse(`unknown account '${id}'`);
    return row;
  }
  function insufficient(db, m) {
    const { balance, held } = account(db, m.account);
    return new Refuse(
      `insufficient funds: account '${m.account}' has ${balance - held} available,` +
        ` needs ${m.amount}`,
    );
  }
  function ledger(db, call, accountId, delta, undo = false) {
    const branch = undo ? `${call.branchId}/${call.operation}` : call.branchId;
    db.prepare(
      "INSERT INTO ledger (gid, branch_id, account, delta, balance_after)" +
        " VALUES (?, ?, ?, ?, (SELECT balance FROM accounts WHERE id = ?))",
    ).run(call.gid, branch, accountId, delta, accountId);
  }
  function update(db, sql, ...params) {
    // Commit and abort act on what prepare checked and held: a missing row is a bug.
    if (db.prepare(sql).run(...params).changes !== 1) {
      throw new Error(`bank: account row missing for ${JSON.stringify(params)}`);
    }
  }
  // Named parameters (better-sqlite3 does not bind numbered ones like ?1).
  const TAKE =
    "UPDATE accounts SET balance = balance - @amount WHERE id = @account" +
    " AND balance - held >= @amount";
  const GIVE = "UPDATE accounts SET balance = balance + ? WHERE id = ?";

  function addCounter(db, key, delta) {
    db.prepare(
      "INSERT INTO counters (key, value) VALUES (?, ?)" +
        " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
    ).run(key, delta);
  }
  function counter(db, key) {
    const row = db.prepare("SELECT value FROM counters WHERE key = ?").get(key);
    return row ? row.value : 0;
  }

  return {
    setup(db) {
      st = db;
      db.exec(SCHEMA);
      const ins = q("INSERT OR IGNORE INTO accounts (id, balance) VALUES (?, ?)");
      db.transaction(() => {
        for (const [id, balance] of seed) ins.run(id, balance);
      })();
    },
    prepare: {
      debit(db, call) {
        const m = movement(call);
        const held = db
          .prepare(
            "UPDATE accounts SET held = held + @amount WHERE id = @account" +
              " AND balance - held >= @amount",
          )
          .run(m).changes;
        if (held !== 1) throw insufficient(db, m);
        return "yes";
      },
      credit(db, call) {
        account(db, movement(call).account);
        return "yes";
      },
      balance(db, call) {
        account(db, movement(call, { amount: false }).account);
        return "read-only";
      },
      "conformance.add"(db, call) {
        const c = counterArgs(call);
        if (c.vote === "no") throw new Refuse(`vote no on '${c.key}' (asked by the payload)`);
        // The staged +N is the prepared branch's row (operation and payload).
        return c.vote === "read-only" ? "read-only" : "yes";
      },
      "conformance.get"(db, call) {
        counterArgs(call, { amount: false });
        return "read-only";
      },
    },
    commit: {
      debit(db, call) {
        const m = movement(call);
        update(
          db,
          "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?",
          m.amount,
          m.amount,
          m.account,
        );
        ledger(db, call, m.account, -m.amount);
      },
      credit(db, call) {
        const m = movement(call);
        update(db, GIVE, m.amount, m.account);
        ledger(db, call, m.account, m.amount);
      },
      "conformance.add"(db, call) {
        const c = counterArgs(call);
        addCounter(db, c.key, c.amount);
      },
    },
    abort: {
      debit(db, call) {
        const m = movement(call);
        update(db, "UPDATE accounts SET held = held - ? WHERE id = ?", m.amount, m.account);
      },
      // credit and conformance.add hold nothing at prepare: nothing to undo.
    },
    execute: {
      debit(db, call) {
        const m = movement(call);
        if (db.prepare(TAKE).run(m).changes !== 1) throw insufficient(db, m);
        ledger(db, call, m.account, -m.amount);
      },
      credit(db, call) {
        const m = movement(call);
        if (db.prepare(GIVE).run(m.amount, m.account).changes !== 1) {
          throw new Refuse(`unknown account '${m.account}'`);
        }
        ledger(db, call, m.account, m.amount);
      },
      "conformance.add"(db, call) {
        const c = counterArgs(call);
        if (c.vote === "no") throw new Refuse(`step refused on '${c.key}' (asked by the payload)`);
        addCounter(db, c.key, c.amount);
      },
      "conformance.get"(db, call) {
        const { key } = counterArgs(call, { amount: false });
        return Buffer.from(JSON.stringify({ key, value: counter(db, key) }));
      },
    },
    compensate: {
      refund(db, call) {
        const m = movement(call);
        update(db, GIVE, m.amount, m.account);
        ledger(db, call, m.account, m.amount, true);
      },
      uncredit(db, call) {
        const m = movement(call);
        if (db.prepare(TAKE).run(m).changes !== 1) {
          const { balance, held } = account(db, m.account);
          throw new NotYet(
            `funds already spent: account '${m.account}' has ${balance - held} available,` +
              ` needs ${m.amount} to take back the credit`,
          );
        }
        ledger(db, call, m.account, -m.amount, true);
      },
      "conformance.add"(db, call) {
        const c = counterArgs(call);
        addCounter(db, c.key, -c.amount);
      },
      "conformance.get"() {},
    },
  };
}
