// The seed project's pagination scenario, as its README and issue 9 give it: 200 VUs for 30 s on
// GET /api/products?page=P&limit=10 with P drawn from 1..PAGES (10), each VU pausing THINK_MS
// (50) after every answer. scripts/bench also runs it against its raw WSGI reference (RAW=1).
//   k6 run -e BASE_URL=http://127.0.0.1:8000 k6/seed-pagination.js
// Optional: VUS (200), DURATION (30s), THINK_MS (50), PAGES (10), SUMMARY=path (JSON summary),
// P95_MS (latency threshold, default 2000), RAW=1.
import http from 'k6/http';
import { check, sleep } from 'k6';
import { AUTH, BASE_URL, LIMIT, LIST, OK_CACHED, commonOptions, report } from './lib.js';

const VUS = parseInt(__ENV.VUS || '200', 10);
const DURATION = __ENV.DURATION || '30s';
const THINK_MS = parseFloat(__ENV.THINK_MS || '50');
const PAGES = parseInt(__ENV.PAGES || '10', 10);

export const options = commonOptions({ vus: VUS, duration: DURATION });

export default function () {
  const page = 1 + Math.floor(Math.random() * PAGES);
  const res = http.get(`${BASE_URL}/api/products?page=${page}&limit=${LIMIT}`, {
    headers: AUTH,
    tags: { name: LIST },
  });
  check(res, OK_CACHED);
  sleep(THINK_MS / 1000);
}

export function handleSummary(data) {
  return report(data, {
    script: 'seed-pagination',
    vus: VUS,
    duration: DURATION,
    extra: (d, s) => {
      s.think_ms = THINK_MS;
      s.pages = PAGES;
      return [`  think time ${THINK_MS} ms, pages 1..${PAGES}`];
    },
  });
}
