// A mixed workload: 80% single-product reads (half /api/products/<id>, half .../stock), 15% list
// pages, 5% stock writes ({"delta": -1} 80% / {"delta": +1} 20%; 409 insufficient_stock is expected).
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=30s -e PRODUCTS=10000 k6/mixed.js
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000).
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const SCRIPT = 'mixed';
const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
const VUS = parseInt(__ENV.VUS || '200', 10);
const DURATION = __ENV.DURATION || '30s';
const PRODUCTS = parseInt(__ENV.PRODUCTS || '10000', 10);
const P95_MS = parseFloat(__ENV.P95_MS || '2000');
const LIMIT = 10;
const PAGES = Math.max(1, Math.floor(PRODUCTS / LIMIT));
const PRODUCT = 'GET /api/products/:id';
const STOCK = 'GET /api/products/:id/stock';
const LIST = 'GET /api/products?page=:page&limit=:limit';
const WRITE = 'POST /api/products/:id/update-stock';
const NAMES = [PRODUCT, STOCK, LIST, WRITE];

http.setResponseCallback(http.expectedStatuses(200, 409));
const insufficientStock = new Counter('insufficient_stock');

// A threshold on a tagged submetric is what makes k6 keep (and report) it: one set per endpoint.
const perEndpoint = {};
for (const name of NAMES) {
  perEndpoint[`http_reqs{name:${name}}`] = ['count>0'];
  perEndpoint[`http_req_failed{name:${name}}`] = ['rate<0.01'];
  perEndpoint[`http_req_duration{name:${name}}`] = [`p(95)<${P95_MS}`];
}

export const options = {
  vus: VUS,
  duration: DURATION,
  discardResponseBodies: true,
  userAgent: 'faststock-bench/k6',
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    http_req_duration: [`p(95)<${P95_MS}`],
    ...perEndpoint,
  },
};

const randomId = () => 1 + Math.floor(Math.random() * PRODUCTS);
const ok200 = { 'status is 200': (r) => r.status === 200 };

export default function () {
  const r = Math.random();
  if (r < 0.4) {
    check(http.get(`${BASE_URL}/api/products/${randomId()}`, { tags: { name: PRODUCT } }), ok200);
  } else if (r < 0.8) {
    check(http.get(`${BASE_URL}/api/products/${randomId()}/stock`, { tags: { name: STOCK } }), ok200);
  } else if (r < 0.95) {
    const page = 1 + Math.floor(Math.random() * PAGES);
    const url = `${BASE_URL}/api/products?page=${page}&limit=${LIMIT}`;
    check(http.get(url, { tags: { name: LIST } }), ok200);
  } else {
    const res = http.post(
      `${BASE_URL}/api/products/${randomId()}/update-stock`,
      JSON.stringify({ delta: Math.random() < 0.8 ? -1 : 1 }),
      { headers: { 'Content-Type': 'application/json' }, tags: { name: WRITE } },
    );
    if (res.status === 409) insufficientStock.add(1);
    check(res, { 'write status is 200 or 409': (x) => x.status === 200 || x.status === 409 });
  }
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
  return report(data, [{ name: 'default', seconds: seconds(DURATION) }], NAMES);
}
