// The seed project's stock scenario, as its README gives it: 300 VUs for 30 s on
// GET /api/products/:id/stock (random ids), each VU pausing THINK_MS (50) after every answer.
// scripts/bench also runs it against its raw WSGI reference (RAW=1) for the ratio.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e PRODUCTS=10000 k6/seed-stock.js
// Optional: VUS (300), DURATION (30s), THINK_MS (50), SUMMARY=path (JSON summary), P95_MS
// (latency threshold, default 2000), RAW=1.
import { check, sleep } from 'k6';
import { OK_CACHED, STOCK, commonOptions, read, report } from './lib.js';

const VUS = parseInt(__ENV.VUS || '300', 10);
const DURATION = __ENV.DURATION || '30s';
const THINK_MS = parseFloat(__ENV.THINK_MS || '50');

export const options = commonOptions({ vus: VUS, duration: DURATION });

export default function () {
  check(read(STOCK), OK_CACHED);
  sleep(THINK_MS / 1000);
}

export function handleSummary(data) {
  return report(data, {
    script: 'seed-stock',
    vus: VUS,
    duration: DURATION,
    extra: (d, s) => {
      s.think_ms = THINK_MS;
      return [`  think time ${THINK_MS} ms`];
    },
  });
}
