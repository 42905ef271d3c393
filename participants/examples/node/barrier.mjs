// The barrier and fencing of an Accord participant, in SQLite (better-sqlite3), with the
// same rules as the Python SDK's (participants/_barrier.py):
//
// - accord_barrier(gid, branch_id, op, ...), UNIQUE (gid, branch_id, op): the final
//   answer of each (branch, op). A duplicate call gets the recorded answer without
//   running the handler. "Not yet" answers and internal errors are not recorded.
// - accord_branches(gid, branch_id, operation, payload, state, ...): one row per 2PC
//   branch voted on; a PREPARED row keeps the staged change (operation and payload), so
//   a prepared branch survives a restart and Commit applies what Prepare checked.
// - accord_fence(shard, epoch): the highest coordinator epoch seen per shard; a call with
//   a lower (non-zero) epoch is refused with FAILED_PRECONDITION ("fenced").
// - Abort before Prepare: a recorded no-op that also records the Prepare as refused, so
//   the late Prepare is refused. Compensate before Execute: the same, for the Execute.
// - The business change, the barrier row, the branch row and the fence are written in
//   ONE SQLite transaction: all durable or none (a handler's refusal is undone with a
//   savepoint, and its refusal recorded).

import Database from "better-sqlite3";

// gRPC status codes (the participant result contract, participant.proto).
export const Code = Object.freeze({
  OK: 0,
  INVALID_ARGUMENT: 3,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  RESOURCE_EXHAUSTED: 8,
});

/** A business "no": the vote is no, or the saga step failed for good (ABORTED). */
export class Refuse extends Error {}
/** "Not yet": nothing happened, the coordinator retries (FAILED_PRECONDITION). */
export class NotYet extends Error {}

const MAX_EPOCH = (1n << 63n) - 1n;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS accord_barrier (
    gid        TEXT NOT NULL,
    branch_id  TEXT NOT NULL,
    op         TEXT NOT NULL,
    code       INTEGER NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    read_only  INTEGER NOT NULL DEFAULT 0,
    result     BLOB NOT NULL DEFAULT x'',
    created_at REAL NOT NULL,
    PRIMARY KEY (gid, branch_id, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accord_branches (
    gid                 TEXT NOT NULL,
    branch_id           TEXT NOT NULL,
    operation           TEXT NOT NULL,
    payload             BLOB NOT NULL,
    state               TEXT NOT NULL,
    coordinator_address TEXT NOT NULL DEFAULT '',
    shard               TEXT NOT NULL DEFAULT '',
    epoch               TEXT NOT NULL DEFAULT '0',
    prepared_at         REAL NOT NULL,
    updated_at          REAL NOT NULL,
    PRIMARY KEY (gid, branch_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accord_branches_prepared
    ON accord_branches (prepared_at) WHERE state = 'PREPARED';
CREATE TABLE IF NOT EXISTS accord_fence (
    shard      TEXT PRIMARY KEY,
    epoch      TEXT NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
`;

const now = () => Date.now() / 1000;

/** One answer: a gRPC code, its message, and (when OK) the BranchResponse fields. */
function answer(code, message, { readOnly = false, result = Buffer.alloc(0) } = {}) {
  return { code, message, readOnly, result };
}

const PREPARED = answer(Code.OK, "prepared");
const READ_ONLY = answer(Code.OK, "read-only", { readOnly: true });
const COMMITTED = answer(Code.OK, "committed");
const ABORTED = answer(Code.OK, "aborted");
const COMPENSATED = answer(Code.OK, "compensated");

/**
 * The store: the SQLite file, the barrier, and the business logic's handlers.
 *
 * `logic` has `setup(db)` and five handler tables keyed by operation name:
 * `prepare[op](db, call) -> "yes" | "read-only"` (or throws Refuse / NotYet),
 * `commit[op](db, call)`, `abort[op](db, call)`, `execute[op](db, call) -> Buffer?`,
 * `compensate[op](db, call)`. `call` is {gid, branchId, operation, payload (Buffer),
 * shard, epoch (BigInt), coordinatorAddress, onePhase}.
 */
export class BarrierStore {
  constructor(path, logic) {
    this.db = new Database(path);
    this.db.pragma("journal_mode = WAL");
    // Every answer is durable before it is sent (fsync at each commit).
    this.db.pragma("synchronous = FULL");
    this.db.pragma("busy_timeout = 5000");
    this.db.exec(SCHEMA);
    this.logic = logic;
    logic.setup(this.db);
    const db = this.db;
    this.sql = {
      recorded: db.prepare(
        "SELECT code, message, read_only, result FROM accord_barrier" +
          " WHERE gid = ? AND branch_id = ? AND op = ?",
      ),
      record: db.prepare(
        "INSERT INTO accord_barrier (gid, branch_id, op, code, message, read_only, result," +
          " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
      ),
      branch: db.prepare(
        "SELECT state, operation, payload FROM accord_branches WHERE gid = ? AND branch_id = ?",
      ),
      insertBranch: db.prepare(
        "INSERT INTO accord_branches (gid, branch_id, operation, payload, state," +
          " coordinator_address, shard, epoch, prepared_at, updated_at)" +
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      ),
      setState: db.prepare(
        "UPDATE accord_branches SET state = ?, updated_at = ? WHERE gid = ? AND branch_id = ?",
      ),
      fence: db.prepare("SELECT epoch FROM accord_fence WHERE shard = ?"),
      raiseFence: db.prepare(
        "INSERT INTO accord_fence (shard, epoch, updated_at) VALUES (?, ?, ?)" +
          " ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch," +
          " updated_at = excluded.updated_at",
      ),
      prepared: db.prepare("SELECT count(*) AS n FROM accord_branches WHERE state = 'PREPARED'"),
    };
    // One call = one IMMEDIATE transaction (the writer lock taken at once).
    this._txn = db.transaction((op, call) => this._run(op, call));
  }

  close() {
    this.db.close();
  }

  preparedCount() {
    return this.sql.prepared.get().n;
  }

  /** Runs one call (op: prepare|commit|abort|execute|compensate); returns its answer. */
  call(op, call) {
    const invalid = validate(call);
    if (invalid) return answer(Code.INVALID_ARGUMENT, invalid);
    try {
      return this._txn.immediate(op, call);
    } catch (err) {
      // The traceback goes to the log, never to the caller; INTERNAL is retryable.
      console.error(`event=${op} gid=${call.gid} branch=${call.branchId} status=INTERNAL`, err);
      return answer(Code.INTERNAL, `${op} failed: internal error in the participant`);
    }
  }

  // -- inside the call's transaction ----------------------------------------------------

  _run(op, call) {
    let raise = null;
    if (call.shard) {
      const row = this.sql.fence.get(call.shard);
      const seen = row ? BigInt(row.epoch) : null;
      if (seen !== null && call.epoch > 0n && call.epoch < seen) {
        return answer(
          Code.FAILED_PRECONDITION,
          `fenced: epoch ${call.epoch} < ${seen} for shard '${call.shard}'`,
        );
      }
      if (seen === null || call.epoch > seen) raise = call.epoch;
    }
    let result;
    switch (op) {
      case "prepare":
        result = this._prepare(call);
        break;
      case "commit":
        result = this._commit(call);
        break;
      case "abort":
        result = this._abort(call);
        break;
      case "execute":
        result = this._execute(call);
        break;
      case "compensate":
        result = this._compensate(call);
        break;
      default:
        throw new Error(`unknown op ${op}`);
    }
    // Kept even when the call answers "not yet" (a raised epoch is a fact).
    if (raise !== null) this.sql.raiseFence.run(call.shard, raise.toString(), now());
    return result;
  }

  _recorded(call, op) {
    const row = this.sql.recorded.get(call.gid, call.branchId, op);
    if (!row) return null;
    return answer(row.code, row.message, { readOnly: !!row.read_only, result: row.result });
  }

  _record(call, result, ...ops) {
    const t = now();
    for (const op of ops) {
      this.sql.record.run(
        call.gid,
        call.branchId,
        op,
        result.code,
        result.message,
        result.readOnly ? 1 : 0,
        result.result,
        t,
      );
    }
  }

  _insertBranch(call, state) {
    const t = now();
    this.sql.insertBranch.run(
      call.gid,
      call.branchId,
      call.operation,
      call.payload,
      state,
      call.coordinatorAddress,
      call.shard,
      call.epoch.toString(),
      t,
      t,
    );
  }

  _branch(call) {
    const row = this.sql.branch.get(call.gid, call.branchId);
    return row ? { state: row.state, operation: row.operation, payload: row.payload } : null;
  }

  _setState(call, state) {
    this.sql.setState.run(state, now(), call.gid, call.branchId);
  }

  /**
   * Runs a handler in a savepoint: its changes are undone if it throws. Returns
   * {value} or {refused: reason} or {notYet: reason}; any other error propagates
   * (INTERNAL: the whole call is rolled back).
   */
  _handler(fn) {
    try {
      return { value: this.db.transaction(fn)() };
    } catch (err) {
      if (err instanceof Refuse) return { refused: err.message };
      if (err instanceof NotYet) return { notYet: err.message };
      throw err;
    }
  }

  _handlerFor(table, call) {
    return this.logic[table][call.operation];
  }

  _prepare(call) {
    const recorded = this._recorded(call, "prepare");
    if (recorded) return recorded;
    const fn = this._handlerFor("prepare", call);
    const out = fn
      ? this._handler(() => fn(this.db, call))
      : { refused: `unknown operation '${call.operation}'` };
    if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
    if (out.refused !== undefined) {
      const no = answer(Code.ABORTED, out.refused);
      this._record(call, no, "prepare");
      this._insertBranch(call, "ABORTED");
      return no;
    }
    if (out.value === "read-only") {
      this._record(call, READ_ONLY, "prepare");
      this._insertBranch(call, "READ_ONLY");
      return READ_ONLY;
    }
    this._record(call, PREPARED, "prepare");
    this._insertBranch(call, "PREPARED");
    return PREPARED;
  }

  _commit(call) {
    const recorded = this._recorded(call, "commit");
    if (recorded) return recorded;
    const branch = this._branch(call);
    if (!branch) {
      if (!call.onePhase) {
        return answer(Code.FAILED_PRECONDITION, "commit without a prepare: no yes vote recorded");
      }
      return this._onePhase(call);
    }
    if (branch.state === "ABORTED") {
      if (call.onePhase) {
        // The answer of a one-phase commit is the outcome.
        const no = answer(Code.ABORTED, "already aborted");
        this._record(call, no, "commit");
        return no;
      }
      return answer(Code.FAILED_PRECONDITION, "commit refused: branch already aborted");
    }
    let result;
    if (branch.state === "PREPARED") {
      // The prepared branch is the truth: commit what was prepared.
      const stored = { ...call, operation: branch.operation, payload: branch.payload };
      const fn = this.logic.commit[stored.operation];
      const out = this._handler(() => fn && fn(this.db, stored));
      if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
      if (out.refused !== undefined) {
        throw new Error(`commit handler refused after a yes vote: ${out.refused}`);
      }
      this._setState(call, "COMMITTED");
      result = COMMITTED;
    } else {
      // READ_ONLY (COMMITTED is answered from the barrier row).
      result = answer(Code.OK, `nothing to commit: branch is ${branch.state}`);
    }
    this._record(call, result, "commit");
    return result;
  }

  _onePhase(call) {
    const prepare = this._handlerFor("prepare", call);
    const commit = this._handlerFor("commit", call);
    const out = prepare
      ? this._handler(() => {
          const vote = prepare(this.db, call);
          if (vote !== "read-only" && commit) commit(this.db, call);
          return vote;
        })
      : { refused: `unknown operation '${call.operation}'` };
    if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
    if (out.refused !== undefined) {
      const no = answer(Code.ABORTED, out.refused);
      this._record(call, no, "prepare", "commit");
      this._insertBranch(call, "ABORTED");
      return no;
    }
    const result = answer(Code.OK, "committed (one phase)", {
      readOnly: out.value === "read-only",
    });
    this._record(call, result, "prepare", "commit");
    this._insertBranch(call, "COMMITTED");
    return result;
  }

  _abort(call) {
    const recorded = this._recorded(call, "abort");
    if (recorded) return recorded;
    const branch = this._branch(call);
    let result;
    if (!branch) {
      // Abort before Prepare: refuse the late Prepare in advance (no hanging).
      const late = answer(Code.ABORTED, "already aborted: the abort arrived before the prepare");
      this._record(call, late, "prepare");
      this._insertBranch(call, "ABORTED");
      result = answer(Code.OK, "no-op: aborted before prepare");
    } else if (branch.state === "COMMITTED") {
      return answer(Code.FAILED_PRECONDITION, "abort refused: branch already committed");
    } else if (branch.state === "PREPARED") {
      const stored = { ...call, operation: branch.operation, payload: branch.payload };
      const fn = this.logic.abort[stored.operation];
      const out = this._handler(() => fn && fn(this.db, stored));
      if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
      if (out.refused !== undefined) throw new Error(`abort handler refused: ${out.refused}`);
      this._setState(call, "ABORTED");
      result = ABORTED;
    } else {
      result = answer(Code.OK, `no-op: branch holds nothing (${branch.state})`);
    }
    this._record(call, result, "abort");
    return result;
  }

  _execute(call) {
    const recorded = this._recorded(call, "execute");
    if (recorded) return recorded;
    const fn = this._handlerFor("execute", call);
    const out = fn
      ? this._handler(() => fn(this.db, call))
      : { refused: `unknown operation '${call.operation}'` };
    if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
    let result;
    if (out.refused !== undefined) {
      result = answer(Code.ABORTED, out.refused);
    } else {
      result = answer(Code.OK, "executed", {
        result: out.value ? Buffer.from(out.value) : Buffer.alloc(0),
      });
    }
    this._record(call, result, "execute");
    return result;
  }

  _compensate(call) {
    const recorded = this._recorded(call, "compensate");
    if (recorded) return recorded;
    const executed = this._recorded(call, "execute");
    let result;
    if (!executed) {
      // Compensate before Execute: nothing to undo; refuse the late Execute now.
      const late = answer(
        Code.ABORTED,
        "already compensated: the compensation arrived before the action",
      );
      this._record(call, late, "execute");
      result = answer(Code.OK, "no-op: compensated before the action ran");
    } else if (executed.code !== Code.OK) {
      result = answer(Code.OK, "no-op: the action was refused, nothing to undo");
    } else {
      const fn = this._handlerFor("compensate", call);
      if (!fn) {
        return answer(
          Code.FAILED_PRECONDITION,
          `no compensation handler for '${call.operation}'`,
        );
      }
      const out = this._handler(() => fn(this.db, call));
      if (out.notYet !== undefined) return answer(Code.FAILED_PRECONDITION, out.notYet);
      if (out.refused !== undefined) {
        // A compensation must not refuse: answered "not yet", retried by the coordinator.
        console.error(
          `event=compensate_refused gid=${call.gid} branch=${call.branchId} reason=${out.refused}`,
        );
        return answer(Code.FAILED_PRECONDITION, `compensation refused (retried): ${out.refused}`);
      }
      result = COMPENSATED;
    }
    this._record(call, result, "compensate");
    return result;
  }
}

function validate(call) {
  if (!call.gid) return "gid must not be empty";
  if (!call.branchId) return "branch_id must not be empty";
  if (call.epoch > MAX_EPOCH) return `epoch ${call.epoch} is over ${MAX_EPOCH}`;
  return null;
}

/** A BranchRequest (as @grpc/proto-loader decodes it) as a plain call. */
export function toCall(request) {
  const r = request || {};
  let epoch = 0n;
  try {
    epoch = BigInt(r.epoch || 0);
  } catch {
    epoch = 0n;
  }
  return {
    gid: r.gid || "",
    branchId: r.branch_id || "",
    operation: r.operation || "",
    payload: r.payload ? Buffer.from(r.payload) : Buffer.alloc(0),
    shard: r.shard || "",
    epoch,
    coordinatorAddress: r.coordinator_address || "",
    onePhase: !!r.one_phase,
    traceContext: r.trace_context || {},
  };
}
