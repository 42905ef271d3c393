// Drives Accord's web console in Debian's chromium (headless) with playwright-core.
// Run by tests/integration/test_console.py against a live topology; by hand:
//
//   CONSOLE_SPEC=/path/spec.json node tests/browser/console.spec.mjs
//
// spec.json (written by the pytest test):
//   url          the console with --console-actions and --trace-url
//   plain_url    the same read side without --console-actions (buttons disabled)
//   out          directory for screenshots and the live-update handshake files
//   trace_url    the --trace-url template
//   gids         {committed: [...], aborted: [...], xss: gid, script_abort: gid,
//                 compensated: gid, stuck: gid, running: gid}
//   xss          the HTML that must show as text
//
// Live update handshake: once the transactions page is subscribed (its status says
// "live") this script writes OUT/ready-live; the test then runs a transaction and writes
// its gid to OUT/live-gid; the row must appear without a reload.
//
// Exits 0 when every check passed; otherwise prints "FAIL: <what>" and exits 1.

import { chromium } from "playwright-core";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const spec = JSON.parse(readFileSync(process.env.CONSOLE_SPEC, "utf8"));
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const STEP_TIMEOUT_MS = 20000;
const problems = [];
const dialogs = [];
let step = "start";

function log(msg) {
  console.log(`[console.spec] ${msg}`);
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function shot(page, name) {
  const path = join(spec.out, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  log(`screenshot ${path}`);
}

async function rowsOf(page) {
  return page.$$eval("#txn-table tbody tr", (trs) => trs.map((tr) => ({
    gid: tr.dataset.gid,
    state: tr.dataset.state,
    reason: tr.querySelector("td.reason")?.textContent ?? "",
  })));
}

async function waitFile(path, timeoutMs) {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (existsSync(path)) return readFileSync(path, "utf8").trim();
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no ${path} within ${timeoutMs} ms`);
}

async function watch(page) {
  page.on("dialog", async (d) => { dialogs.push(d.message()); await d.dismiss(); });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // A failed request shows as "Failed to load resource" without its URL: name it here.
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`);
  });
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource|EventSource|ERR_INCOMPLETE_CHUNKED_ENCODING|net::ERR_ABORTED/.test(m.text())) {
      problems.push(`console error: ${m.text()}`);
    }
  });
}

async function transactionsPage(page) {
  const g = spec.gids;
  step = "transactions page loads";
  await page.goto(spec.url + "/");
  await page.waitForSelector("#txn-table tbody tr", { timeout: STEP_TIMEOUT_MS });
  const all = await rowsOf(page);
  for (const gid of [...g.committed, ...g.aborted, g.compensated, g.stuck]) {
    check(all.some((r) => r.gid === gid), `${gid} is not in the table: ${JSON.stringify(all.map((r) => r.gid))}`);
  }
  await page.waitForSelector("#counts button.count[data-state='ABORTED']", { timeout: STEP_TIMEOUT_MS });
  const aborted = Number(await page.textContent("#counts button.count[data-state='ABORTED'] .n"));
  check(aborted >= g.aborted.length, `the ABORTED count says ${aborted}`);
  await page.waitForSelector("#sparkline rect.spark-tput", { state: "attached", timeout: STEP_TIMEOUT_MS });
  await page.waitForSelector("#live-status.on", { timeout: STEP_TIMEOUT_MS });
  await shot(page, "transactions");

  step = "filter state ABORTED";
  await page.selectOption("#filters select[name=state]", ["ABORTED"]);
  await page.click("#apply");
  await page.waitForFunction(() => location.search.includes("state=ABORTED"), null, { timeout: STEP_TIMEOUT_MS });
  await page.waitForFunction(
    () => [...document.querySelectorAll("#txn-table tbody tr")].every((tr) => tr.dataset.state === "ABORTED"),
    null, { timeout: STEP_TIMEOUT_MS });
  const onlyAborted = await rowsOf(page);
  check(onlyAborted.length >= g.aborted.length, `only ${onlyAborted.length} rows under ABORTED`);
  check(onlyAborted.every((r) => r.state === "ABORTED"), `a row that is not ABORTED: ${JSON.stringify(onlyAborted)}`);
  for (const gid of g.aborted) check(onlyAborted.some((r) => r.gid === gid), `aborted ${gid} missing under the filter`);
  for (const gid of g.committed) check(!onlyAborted.some((r) => r.gid === gid), `committed ${gid} shown under ABORTED`);

  step = "escaping in the table";
  const xssRow = onlyAborted.find((r) => r.gid === g.xss);
  check(xssRow && xssRow.reason.includes(spec.xss), `the refusal's reason does not show the HTML as text: ${JSON.stringify(xssRow)}`);
  const scriptRow = onlyAborted.find((r) => r.gid === g.script_abort);
  check(scriptRow && scriptRow.reason.includes("<script>"), `the Abort reason does not show <script> as text: ${JSON.stringify(scriptRow)}`);
  const injected = await page.$$eval("#txn-table img, #txn-table script, #txn-table b", (els) => els.length);
  check(injected === 0, `${injected} element(s) made from data in the table`);
  await shot(page, "transactions-aborted");

  step = "filter stuck (checkbox) and reset";
  await page.click("#reset");
  await page.check("#filters input[name=stuck]");
  await page.click("#apply");
  await page.waitForFunction(
    () => { const trs = [...document.querySelectorAll("#txn-table tbody tr")]; return trs.length > 0 && trs.every((tr) => tr.dataset.state === "STUCK"); },
    null, { timeout: STEP_TIMEOUT_MS });
  check((await rowsOf(page)).some((r) => r.gid === g.stuck), "the STUCK saga is missing under stuck");

  step = "next page";
  await page.goto(spec.url + "/?page_size=2");
  await page.waitForFunction(() => document.querySelectorAll("#txn-table tbody tr").length === 2, null, { timeout: STEP_TIMEOUT_MS });
  const first = (await rowsOf(page)).map((r) => r.gid);
  check(!(await page.isDisabled("#next-page")), "no next page with page_size=2");
  await page.click("#next-page");
  await page.waitForFunction(() => (document.getElementById("page-info").textContent || "").startsWith("page 2"), null, { timeout: STEP_TIMEOUT_MS });
  const second = (await rowsOf(page)).map((r) => r.gid);
  check(second.length === 2 && second.every((gid) => !first.includes(gid)), `page 2 ${second} repeats page 1 ${first}`);
}

async function liveUpdate(page) {
  step = "live update";
  await page.goto(spec.url + "/");
  await page.waitForSelector("#txn-table tbody tr", { timeout: STEP_TIMEOUT_MS });
  await page.waitForSelector("#live-status.on", { timeout: STEP_TIMEOUT_MS });
  await page.evaluate(() => { window.__notReloaded = true; });
  writeFileSync(join(spec.out, "ready-live"), "1");
  const gid = await waitFile(join(spec.out, "live-gid"), 60000);
  log(`waiting for live row ${gid}`);
  await page.waitForSelector(`#txn-table tbody tr[data-gid="${gid}"]`, { timeout: STEP_TIMEOUT_MS });
  // The test writes the file once the commit has returned to its client.
  const after = Date.now() - statSync(join(spec.out, "live-gid")).mtimeMs;
  log(`live row shown ${Math.round(after)} ms after the commit returned`);
  await page.waitForSelector(`#txn-table tbody tr[data-gid="${gid}"][data-state="COMMITTED"]`, { timeout: STEP_TIMEOUT_MS });
  check(await page.evaluate(() => window.__notReloaded === true), "the page reloaded instead of updating live");
  const firstGid = await page.$eval("#txn-table tbody tr", (tr) => tr.dataset.gid);
  check(firstGid === gid, `the live row is not prepended (first row ${firstGid})`);
  await shot(page, "transactions-live");
}

async function transactionPage(page) {
  const g = spec.gids;
  step = "saga timeline";
  await page.goto(`${spec.url}/transaction?gid=${encodeURIComponent(g.compensated)}`);
  await page.waitForSelector("#gantt rect.seg", { timeout: STEP_TIMEOUT_MS });
  const lanes = await page.$$eval("#gantt g.lane", (gs) => gs.map((gEl) => ({
    name: gEl.dataset.lane,
    segs: [...gEl.querySelectorAll("rect.seg")].map((r) => `${r.dataset.phase}:${r.dataset.state}`),
  })));
  log(`saga lanes ${JSON.stringify(lanes)}`);
  const byName = Object.fromEntries(lanes.map((l) => [l.name, l.segs]));
  check(byName.transaction && byName.transaction.length >= 2, `no transaction lane: ${JSON.stringify(lanes)}`);
  check(byName.debit && byName.debit.includes("action:SUCCEEDED") && byName.debit.includes("compensation:COMPENSATED"),
    `step debit should have run and been compensated: ${JSON.stringify(byName.debit)}`);
  check(byName.refused && byName.refused.some((s) => s.startsWith("action:FAILED")), `step refused should have failed: ${JSON.stringify(byName.refused)}`);
  const state = await page.textContent("#summary .badge");
  check(state === "COMPENSATED", `state ${state}`);
  const errors = await page.textContent("#errors");
  check(errors.includes("unknown account"), `the step's error is not listed: ${errors}`);
  const link = await page.$("#trace-link:not([hidden])");
  const traceId = await page.evaluate(async (gid) => (await (await fetch(`/api/transaction?gid=${encodeURIComponent(gid)}`)).json()).summary.trace_id, g.compensated);
  if (traceId) {
    check(link, "a traced transaction without a trace link");
    const href = await link.getAttribute("href");
    check(href === spec.trace_url.replace("{trace_id}", traceId), `trace link ${href}`);
  } else {
    check(!link, "a trace link without a trace id");
  }
  check(await page.isDisabled("#retry-btn") && await page.isDisabled("#cancel-btn"), "actions enabled on a COMPENSATED saga");
  await shot(page, "transaction-saga");

  step = "2PC timeline and escaping on the transaction page";
  await page.goto(`${spec.url}/transaction?gid=${encodeURIComponent(g.xss)}`);
  await page.waitForSelector("#gantt rect.seg", { timeout: STEP_TIMEOUT_MS });
  const phases = await page.$$eval("#gantt rect.seg", (rs) => rs.map((r) => `${r.dataset.phase}:${r.dataset.state}`));
  check(phases.includes("prepare:REFUSED"), `no refused prepare bar: ${phases}`);
  const errText = await page.textContent("#errors");
  check(errText.includes(spec.xss), `the error list does not show the HTML as text: ${errText}`);
  const payload = await page.textContent("#branches tbody");
  check(payload.includes(spec.xss), "the branch payload does not show the HTML as text");
  const made = await page.$$eval("#txn img, #txn script:not([src]), #txn b", (els) => els.length);
  check(made === 0, `${made} element(s) made from data on the transaction page`);
  const key = await page.textContent("#summary");
  check(key.includes("<b>key</b>"), `the idempotency key is not shown as text: ${key}`);
  await shot(page, "transaction-xss");

  step = "operator actions disabled without --console-actions";
  await page.goto(`${spec.plain_url}/transaction?gid=${encodeURIComponent(g.stuck)}`);
  await page.waitForSelector("#summary .badge", { timeout: STEP_TIMEOUT_MS });
  check(await page.isDisabled("#retry-btn"), "retry enabled without --console-actions");
  const tip = await page.getAttribute("#retry-btn", "title");
  check(tip && tip.includes("start accord query with --console-actions"), `tooltip ${tip}`);
  check(!(await page.$("#trace-link:not([hidden])")), "a trace link without --trace-url");
  await shot(page, "transaction-actions-off");

  step = "retry a STUCK saga";
  await page.goto(`${spec.url}/transaction?gid=${encodeURIComponent(g.stuck)}`);
  await page.waitForSelector("#summary .badge", { timeout: STEP_TIMEOUT_MS });
  check(await page.textContent("#summary .badge") === "STUCK", "the stuck saga is not STUCK");
  check(!(await page.isDisabled("#retry-btn")), "retry disabled on a STUCK saga with --console-actions");
  check(await page.isDisabled("#cancel-btn"), "cancel enabled on a STUCK saga");
  await page.click("#retry-btn");
  await page.waitForFunction(() => /retry: the coordinator says|retry failed/.test(document.getElementById("action-result").textContent), null, { timeout: 30000 });
  const retried = await page.textContent("#action-result");
  check(retried.includes("the coordinator says"), `retry: ${retried}`);
  await shot(page, "transaction-retried");

  step = "cancel a running saga";
  await page.goto(`${spec.url}/transaction?gid=${encodeURIComponent(g.running)}`);
  await page.waitForSelector("#summary .badge", { timeout: STEP_TIMEOUT_MS });
  check(await page.textContent("#summary .badge") === "RUNNING", "the running saga is not RUNNING");
  check(!(await page.isDisabled("#cancel-btn")), "cancel disabled on a RUNNING saga");
  await page.click("#cancel-btn");
  await page.waitForFunction(() => /cancel: the coordinator says|cancel: sent|cancel failed/.test(document.getElementById("action-result").textContent), null, { timeout: 30000 });
  const cancelled = await page.textContent("#action-result");
  // The coordinator answers once the saga settles; its compensation is being retried
  // (its participant is down), so the console may answer first that it is settling.
  check(/the coordinator says|still settling/.test(cancelled), `cancel: ${cancelled}`);
  await page.waitForFunction(() => document.querySelector("#summary .badge")?.textContent !== "RUNNING", null, { timeout: STEP_TIMEOUT_MS });
  await shot(page, "transaction-cancelled");
}

async function main() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    const page = await context.newPage();
    await watch(page);
    await transactionsPage(page);
    await liveUpdate(page);
    await transactionPage(page);
    step = "no script ran from data";
    check(dialogs.length === 0, `dialogs opened (injected script ran): ${dialogs}`);
    check(problems.length === 0, problems.join("; "));
  } finally {
    await browser.close();
  }
}

try {
  await main();
  log("all checks passed");
} catch (err) {
  console.error(`FAIL: ${step}: ${err.message}`);
  process.exit(1);
}
