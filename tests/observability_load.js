// The load tests/test_observability.py runs at a live gunicorn so that every dashboard panel has
// data: reads of the three read endpoints (first misses, then hits), stock writes that apply
// (set and delta), one that is refused for want of stock (409), writes and reads of a product
// that does not exist (404) and a malformed id (400). Bounded in count and time: ITERATIONS
// requests at most, within MAX_DURATION. Environment: BASE_URL, PRODUCTS (ids 1..N exist),
// ITERATIONS (2000), MAX_DURATION (15s), SUMMARY (path of the JSON summary written at the end).
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';

const BASE_URL = __ENV.BASE_URL.replace(/\/+$/, '');
const PRODUCTS = parseInt(__ENV.PRODUCTS || '100', 10);
const ABSENT = 1000000000;
// A worker that hangs fails the run within seconds instead of holding it for k6's 60 s default.
const PARAMS = { timeout: '5s' };
const JSON_BODY = { ...PARAMS, headers: { 'Content-Type': 'application/json' } };

export const options = {
  scenarios: {
    mix: {
      executor: 'shared-iterations',
      vus: 8,
      iterations: parseInt(__ENV.ITERATIONS || '2000', 10),
      maxDuration: __ENV.MAX_DURATION || '15s',
      gracefulStop: '2s',
    },
  },
  discardResponseBodies: true,
  // Every answer must be the one its request calls for: a 500 anywhere fails the run.
  thresholds: { checks: ['rate==1'] },
};

http.setResponseCallback(http.expectedStatuses(200, 400, 404, 409));

const post = (id, body) =>
  http.post(`${BASE_URL}/api/products/${id}/update-stock`, JSON.stringify(body), JSON_BODY);
const expect = (res, status) => check(res, { [`status is ${status}`]: (r) => r.status === status });

export default function () {
  const n = exec.scenario.iterationInTest;
  const id = 1 + (n % PRODUCTS);
  const kind = n % 40;
  if (kind < 20) {
    expect(http.get(`${BASE_URL}/api/products/${id}`, PARAMS), 200);
  } else if (kind < 28) {
    expect(http.get(`${BASE_URL}/api/products/${id}/stock`, PARAMS), 200);
  } else if (kind < 32) {
    expect(http.get(`${BASE_URL}/api/products?page=${1 + (n % 10)}&limit=10`, PARAMS), 200);
  } else if (kind < 34) {
    expect(post(id, { delta: 1 }), 200);
  } else if (kind === 34) {
    expect(post(id, { stock: 500 }), 200);
  } else if (kind === 35) {
    // More than any stock can hold: always refused, and nothing changes.
    expect(post(id, { delta: -2147483648 }), 409);
  } else if (kind === 36) {
    expect(post(ABSENT, { delta: 1 }), 404);
  } else if (kind === 37) {
    expect(http.get(`${BASE_URL}/api/products/${ABSENT}`, PARAMS), 404);
  } else if (kind === 38) {
    expect(http.get(`${BASE_URL}/api/products/abc`, PARAMS), 400);
  } else {
    expect(http.get(`${BASE_URL}/api/products/${id}/stock`, PARAMS), 200);
  }
}

export function handleSummary(data) {
  const count = (name) => (data.metrics[name] ? data.metrics[name].values.count : 0);
  const summary = { requests: count('http_reqs'), checks: data.metrics.checks.values };
  return { [__ENV.SUMMARY]: JSON.stringify(summary) };
}
