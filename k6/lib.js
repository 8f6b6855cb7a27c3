// What the k6 scripts in this folder share: the environment they read, their common options and
// thresholds, the requests, and the summary (a stdout line per script, scenario and endpoint, and
// with SUMMARY=path a JSON file {"faststock": ..., "k6": ...} that scripts/bench reads).
// A script imports what it needs (import { commonOptions, read, report } from './lib.js';)
// and keeps only what is its own. Environment:
//   BASE_URL (http://127.0.0.1:8000), VUS (200), DURATION (30s), PRODUCTS (10000: ids 1..N exist),
//   P95_MS (2000: the p(95) latency threshold), SUMMARY (path of the JSON summary; none if unset),
//   RAW (1: the server is scripts/rawref.py, scripts/bench's raw WSGI reference, which answers
//   every request with one constant body: reads are then checked for their status only),
//   API_KEY (none: no Authorization header; else sent as `Authorization: Bearer API_KEY` with
//   every read and write, for a server with API_KEYS, or READS_REQUIRE_KEY=1 for reads).
import http from 'k6/http';
import { Counter } from 'k6/metrics';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
export const VUS = parseInt(__ENV.VUS || '200', 10);
export const DURATION = __ENV.DURATION || '30s';
export const PRODUCTS = parseInt(__ENV.PRODUCTS || '10000', 10);
export const P95_MS = parseFloat(__ENV.P95_MS || '2000');
export const LIMIT = 10;
export const PAGES = Math.max(1, Math.floor(PRODUCTS / LIMIT));
export const RAW = __ENV.RAW === '1';
export const API_KEY = __ENV.API_KEY || '';
// The headers every request carries: the API key's, if one is given.
export const AUTH = API_KEY ? { Authorization: `Bearer ${API_KEY}` } : {};

// Request names (the `name` tag), so that ids and pages do not make a series each.
export const PRODUCT = 'GET /api/products/:id';
export const STOCK = 'GET /api/products/:id/stock';
export const LIST = 'GET /api/products?page=:page&limit=:limit';
export const WRITE = 'POST /api/products/:id/update-stock';

export const randomId = () => 1 + Math.floor(Math.random() * PRODUCTS);
const randomPage = () => 1 + Math.floor(Math.random() * PAGES);

const PATHS = {
  [PRODUCT]: () => `/api/products/${randomId()}`,
  [STOCK]: () => `/api/products/${randomId()}/stock`,
  [LIST]: () => `/api/products?page=${randomPage()}&limit=${LIMIT}`,
};

// read(NAME, tags): GET the read endpoint NAME (PRODUCT, STOCK or LIST) on a random product or
// page.
export function read(name, tags = {}) {
  return http.get(`${BASE_URL}${PATHS[name]()}`, { headers: AUTH, tags: { name, ...tags } });
}

// 409 insufficient_stock answers: expected outcomes of the scripts that write, counted apart.
const insufficientStock = new Counter('insufficient_stock');

// updateStock(id, body, params): POST body (an object, sent as JSON) to .../update-stock.
export function updateStock(id, body, { headers = {}, ...params } = {}) {
  const res = http.post(`${BASE_URL}/api/products/${id}/update-stock`, JSON.stringify(body), {
    headers: { 'Content-Type': 'application/json', ...AUTH, ...headers },
    tags: { name: WRITE },
    ...params,
  });
  if (res.status === 409) insufficientStock.add(1);
  return res;
}

export const OK = { 'status is 200': (r) => r.status === 200 };
export const OK_CACHED = RAW ? OK : { ...OK, 'has X-Cache': (r) => !!r.headers['X-Cache'] };

// commonOptions(extra): the options every script here runs with. `extra.thresholds` add to the
// common thresholds (null removes one); with `extra.scenarios` there is no VUS x DURATION run.
export function commonOptions({ thresholds = {}, ...extra } = {}) {
  const all = {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    http_req_duration: [`p(95)<${P95_MS}`],
    ...thresholds,
  };
  return {
    ...(extra.scenarios ? {} : { vus: VUS, duration: DURATION }),
    discardResponseBodies: true,
    userAgent: 'faststock-bench/k6',
    summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
    ...extra,
    thresholds: Object.fromEntries(Object.entries(all).filter(([, v]) => v !== null)),
  };
}

// perTag(TAG, VALUES, exprs): thresholds on the requests tagged TAG:VALUE, one set per value. A
// threshold on a tagged submetric is what makes k6 keep (and report) it.
export function perTag(tag, values, { reqs = 'count>0', failed = 'rate<0.01', p95 = P95_MS } = {}) {
  const out = {};
  for (const v of values) {
    out[`http_reqs{${tag}:${v}}`] = [reqs];
    out[`http_req_failed{${tag}:${v}}`] = [failed];
    out[`http_req_duration{${tag}:${v}}`] = [`p(95)<${p95}`];
  }
  return out;
}

// ---- summary ----

export function seconds(d) {
  // k6 duration string ("30s", "1m30s", "500ms", "2h") or a bare number of seconds; the parts of
  // "10s+20s+5s" add up.
  if (/^\d+(\.\d+)?$/.test(String(d))) return parseFloat(d);
  const units = { h: 3600, m: 60, s: 1, ms: 0.001, us: 1e-6, µs: 1e-6, ns: 1e-9 };
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)/g;
  let m;
  while ((m = re.exec(String(d))) !== null) total += parseFloat(m[1]) * units[m[2]];
  return total;
}

// count(data, METRIC): a counter's total, 0 when it never counted.
export function count(data, metric) {
  const m = data.metrics[metric];
  return m ? m.values.count : 0;
}

// stats(data, TAG, SECONDS): the figures of all requests (TAG '') or of those tagged TAG
// ('name:...', 'scenario:...'); latencies are null when there were none.
export function stats(data, tag, loadSeconds) {
  const suffix = tag ? `{${tag}}` : '';
  const dur = data.metrics[`http_req_duration${suffix}`];
  const failed = data.metrics[`http_req_failed${suffix}`];
  const requests = count(data, `http_reqs${suffix}`);
  const v = dur && requests > 0 ? dur.values : {};
  return {
    requests,
    rps: loadSeconds > 0 ? requests / loadSeconds : 0,
    avg_ms: v.avg ?? null,
    p50_ms: v.med ?? null,
    p90_ms: v['p(90)'] ?? null,
    p95_ms: v['p(95)'] ?? null,
    p99_ms: v['p(99)'] ?? null,
    failed_rate: failed ? failed.values.rate : null,
  };
}

function summarize(data, { script, vus, duration, scenarios, groups }) {
  const loadSeconds = scenarios.reduce((t, s) => t + s.seconds, 0);
  const failedThresholds = [];
  for (const [metric, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds || {})) {
      if (!t.ok) failedThresholds.push(`${metric} ${expr}`);
    }
  }
  const out = {
    script,
    vus,
    duration,
    load_seconds: loadSeconds,
    ...stats(data, '', loadSeconds),
    checks_rate: data.metrics.checks ? data.metrics.checks.values.rate : null,
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

export function fmt(x, digits) {
  return x === null || x === undefined ? '-' : x.toFixed(digits);
}

export function line(label, s) {
  return (
    `${label}: ${s.requests} reqs, ${fmt(s.rps, 1)} req/s, avg ${fmt(s.avg_ms, 2)} ms, ` +
    `p90 ${fmt(s.p90_ms, 2)} ms, p95 ${fmt(s.p95_ms, 2)} ms, p99 ${fmt(s.p99_ms, 2)} ms, ` +
    `failed ${fmt(s.failed_rate === null ? null : s.failed_rate * 100, 2)}%`
  );
}

// report(data, spec): what handleSummary returns. spec: script (its name), vus and duration (as
// shown; default VUS and DURATION), scenarios ([{name, seconds}]; default one of DURATION), groups
// (request names to report one by one), extra(data, summary): lines to add, after adding its own
// fields to summary if it likes.
export function report(data, spec) {
  const { script, vus = VUS, duration = DURATION, groups = [], extra } = spec;
  const scenarios = spec.scenarios || [{ name: 'default', seconds: seconds(duration) }];
  const s = summarize(data, { script, vus, duration, scenarios, groups });
  const lines = [line(`${script} (${vus} VUs, ${duration})`, s)];
  if (s.insufficient_stock !== null) {
    lines.push(`  409 insufficient_stock: ${s.insufficient_stock}`);
  }
  for (const [name, x] of Object.entries(s.scenarios)) lines.push(line(`  scenario ${name}`, x));
  for (const [name, x] of Object.entries(s.endpoints)) lines.push(line(`  ${name}`, x));
  if (extra) lines.push(...extra(data, s));
  lines.push(
    s.thresholds_ok ? 'thresholds: ok' : `thresholds FAILED: ${s.failed_thresholds.join('; ')}`,
  );
  const result = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY) result[__ENV.SUMMARY] = JSON.stringify({ faststock: s, k6: data }, null, 2);
  return result;
}
