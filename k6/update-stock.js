// POST /api/products/<id>/update-stock with {"delta": K}, in two scenarios run one after the other:
//   random: delta -1 (80%) or +1 (20%) on random products; 409 insufficient_stock is expected
//           now and then (a product that reached 0).
//   hot:    every VU alternates delta -1 / +1 on ONE product (HOT_ID, default 1), so all writers
//           contend for the same row; setup() first sets its stock to HOT_STOCK so it never runs out.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=30s -e PRODUCTS=10000 k6/update-stock.js
// Each scenario runs for DURATION (the whole test takes about 2 x DURATION + 5 s); don't pass
// --duration/--vus on the command line: k6 would replace both scenarios by one.
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000), HOT_ID,
// HOT_STOCK (default 1000000), IDEMPOTENCY=1 (send a unique Idempotency-Key with every write).
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const SCRIPT = 'update-stock';
const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
const VUS = parseInt(__ENV.VUS || '200', 10);
const DURATION = __ENV.DURATION || '30s';
const PRODUCTS = parseInt(__ENV.PRODUCTS || '10000', 10);
const P95_MS = parseFloat(__ENV.P95_MS || '2000');
const HOT_ID = parseInt(__ENV.HOT_ID || '1', 10);
const HOT_STOCK = parseInt(__ENV.HOT_STOCK || '1000000', 10);
const IDEMPOTENCY = __ENV.IDEMPOTENCY === '1';
const NAME = 'POST /api/products/:id/update-stock';
const GRACE_S = 5;
const RUN = Math.random().toString(36).slice(2, 10); // per VU: keeps Idempotency-Keys unique

http.setResponseCallback(http.expectedStatuses(200, 409));
const insufficientStock = new Counter('insufficient_stock');

const perScenario = {};
for (const s of ['random', 'hot']) {
  perScenario[`http_reqs{scenario:${s}}`] = ['count>0'];
  perScenario[`http_req_failed{scenario:${s}}`] = ['rate<0.01'];
  perScenario[`http_req_duration{scenario:${s}}`] = [`p(95)<${P95_MS}`];
}

export const options = {
  discardResponseBodies: true,
  userAgent: 'faststock-bench/k6',
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  scenarios: {
    random: {
      executor: 'constant-vus',
      exec: 'randomDelta',
      vus: VUS,
      duration: DURATION,
      gracefulStop: `${GRACE_S}s`,
    },
    hot: {
      executor: 'constant-vus',
      exec: 'hotDelta',
      vus: VUS,
      duration: DURATION,
      startTime: `${seconds(DURATION) + GRACE_S}s`,
      gracefulStop: `${GRACE_S}s`,
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    ...perScenario,
  },
};

export function setup() {
  const res = http.post(
    `${BASE_URL}/api/products/${HOT_ID}/update-stock`,
    JSON.stringify({ stock: HOT_STOCK }),
    { headers: { 'Content-Type': 'application/json' }, tags: { name: 'setup: set hot stock' } },
  );
  check(res, { 'setup: hot product stock set': (r) => r.status === 200 });
}

function post(id, delta) {
  const headers = { 'Content-Type': 'application/json' };
  if (IDEMPOTENCY) headers['Idempotency-Key'] = `bench-${RUN}-${__VU}-${__ITER}-${id}`;
  const res = http.post(
    `${BASE_URL}/api/products/${id}/update-stock`,
    JSON.stringify({ delta }),
    { headers, tags: { name: NAME }, responseType: 'text' },
  );
  if (res.status === 409) insufficientStock.add(1);
  check(res, {
    'status is 200 or 409': (r) => r.status === 200 || r.status === 409,
    'body matches status': (r) => {
      try {
        const body = JSON.parse(r.body);
        if (r.status === 200) return body.id === id && body.stock >= 0;
        if (r.status === 409) return body.error === 'insufficient_stock';
      } catch (e) {
        return false;
      }
      return false;
    },
  });
}

export function randomDelta() {
  post(1 + Math.floor(Math.random() * PRODUCTS), Math.random() < 0.8 ? -1 : 1);
}

let hotTurn = 0; // per VU: -1, +1, -1, ... so the hot product's stock stays where it was

export function hotDelta() {
  post(HOT_ID, hotTurn++ % 2 === 0 ? -1 : 1);
}

// ---- summary (the same block is in every script here, so each stays self-contained) ----

function seconds(d) {
  // k6 duration string ("30s", "1m30s", "500ms", "2h") or a bare number of seconds.
  if (/^\d+(\.\d+)?$/.test(String(d))) return parseFloat(d);
  const units = { h: 3600, m: 60, s: 1, ms: 0.001, us: 1e-6, µs: 1e-6, ns: 1e-9 };
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)/g;
  let m;
  while ((m = re.exec(String(d))) !== null) total += parseFloat(m[1]) * units[m[2]];
  return total;
}

function stats(data, tag, loadSeconds) {
  const suffix = tag ? `{${tag}}` : '';
  const reqs = data.metrics[`http_reqs${suffix}`];
  const dur = data.metrics[`http_req_duration${suffix}`];
  const failed = data.metrics[`http_req_failed${suffix}`];
  const count = reqs ? reqs.values.count : 0;
  const v = dur ? dur.values : {};
  return {
    requests: count,
    rps: loadSeconds > 0 ? count / loadSeconds : 0,
    avg_ms: v.avg ?? null,
    p90_ms: v['p(90)'] ?? null,
    p95_ms: v['p(95)'] ?? null,
    p99_ms: v['p(99)'] ?? null,
    failed_rate: failed ? failed.values.rate : null,
  };
}

function summarize(data, scenarios, groups) {
  const loadSeconds = scenarios.reduce((t, s) => t + s.seconds, 0);
  const failedThresholds = [];
  for (const [metric, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds || {})) {
      if (!t.ok) failedThresholds.push(`${metric} ${expr}`);
    }
  }
  const out = {
    script: SCRIPT,
    vus: VUS,
    duration: DURATION,
    load_seconds: loadSeconds,
    ...stats(data, '', loadSeconds),
    checks_rate: data.metrics.checks ? data.metrics.checks.values.rate : null,
    // 409 insufficient_stock answers, counted by the scripts that write (expected outcomes).
    insufficient_stock: data.metrics.insufficient_stock
      ? data.metrics.insufficient_stock.values.count
      : null,
    thresholds_ok: failedThresholds.length === 0,
    failed_thresholds: failedThresholds,
    scenarios: {},
    endpoints: {},
  };
  if (scenarios.length > 1) {
    for (const s of scenarios) out.scenarios[s.name] = stats(data, `scenario:${s.name}`, s.seconds);
  }
  for (const g of groups) out.endpoints[g] = stats(data, `name:${g}`, loadSeconds);
  return out;
}

function fmt(x, digits) {
  return x === null || x === undefined ? '-' : x.toFixed(digits);
}

function line(label, s) {
  return (
    `${label}: ${s.requests} reqs, ${fmt(s.rps, 1)} req/s, avg ${fmt(s.avg_ms, 2)} ms, ` +
    `p90 ${fmt(s.p90_ms, 2)} ms, p95 ${fmt(s.p95_ms, 2)} ms, p99 ${fmt(s.p99_ms, 2)} ms, ` +
    `failed ${fmt(s.failed_rate === null ? null : s.failed_rate * 100, 2)}%`
  );
}

function report(data, scenarios, groups) {
  const s = summarize(data, scenarios, groups);
  const lines = [line(`${SCRIPT} (${VUS} VUs, ${DURATION})`, s)];
  if (s.insufficient_stock !== null) lines.push(`  409 insufficient_stock: ${s.insufficient_stock}`);
  for (const [name, x] of Object.entries(s.scenarios)) lines.push(line(`  scenario ${name}`, x));
  for (const [name, x] of Object.entries(s.endpoints)) lines.push(line(`  ${name}`, x));
  lines.push(
    s.thresholds_ok ? 'thresholds: ok' : `thresholds FAILED: ${s.failed_thresholds.join('; ')}`,
  );
  const result = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY) result[__ENV.SUMMARY] = JSON.stringify({ faststock: s, k6: data }, null, 2);
  return result;
}

export function handleSummary(data) {
  const s = seconds(DURATION);
  return report(data, [
    { name: 'random', seconds: s },
    { name: 'hot', seconds: s },
  ], []);
}
