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
import { DURATION, VUS, commonOptions, perTag, randomId, report, seconds } from './lib.js';
import { updateStock } from './lib.js';

const HOT_ID = parseInt(__ENV.HOT_ID || '1', 10);
const HOT_STOCK = parseInt(__ENV.HOT_STOCK || '1000000', 10);
const IDEMPOTENCY = __ENV.IDEMPOTENCY === '1';
const GRACE_S = 5;
const RUN = Math.random().toString(36).slice(2, 10); // per VU: keeps Idempotency-Keys unique
const SCENARIOS = ['random', 'hot'];

http.setResponseCallback(http.expectedStatuses(200, 409));

export const options = commonOptions({
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
  thresholds: { http_req_duration: null, ...perTag('scenario', SCENARIOS) },
});

export function setup() {
  const res = updateStock(HOT_ID, { stock: HOT_STOCK }, { tags: { name: 'setup: set hot stock' } });
  check(res, { 'setup: hot product stock set': (r) => r.status === 200 });
}

function post(id, delta) {
  const headers = {};
  if (IDEMPOTENCY) headers['Idempotency-Key'] = `bench-${RUN}-${__VU}-${__ITER}-${id}`;
  const res = updateStock(id, { delta }, { headers, responseType: 'text' });
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
  post(randomId(), Math.random() < 0.8 ? -1 : 1);
}

let hotTurn = 0; // per VU: -1, +1, -1, ... so the hot product's stock stays where it was

export function hotDelta() {
  post(HOT_ID, hotTurn++ % 2 === 0 ? -1 : 1);
}

export function handleSummary(data) {
  const s = seconds(DURATION);
  return report(data, {
    script: 'update-stock',
    scenarios: SCENARIOS.map((name) => ({ name, seconds: s })),
  });
}
