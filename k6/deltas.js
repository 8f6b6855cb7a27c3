// Stock deltas without think time: every VU POSTs {"delta": -1} or {"delta": +1} (even odds, so
// stock does not drift) to /api/products/<random id>/update-stock. pgbench runs the same UPDATE
// on the same kind of draw (scripts/bench pgbench), for the composed limit of issue 9's targets.
// 409 insufficient_stock (a product at 0 drawn -1) is an expected answer, counted apart.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=50 -e DURATION=30s -e PRODUCTS=10000 k6/deltas.js
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000).
import http from 'k6/http';
import { check } from 'k6';
import { commonOptions, randomId, report, updateStock } from './lib.js';

http.setResponseCallback(http.expectedStatuses(200, 409));

export const options = commonOptions();

export default function () {
  const res = updateStock(randomId(), { delta: Math.random() < 0.5 ? -1 : 1 });
  check(res, { 'status is 200 or 409': (r) => r.status === 200 || r.status === 409 });
}

export function handleSummary(data) {
  return report(data, { script: 'deltas' });
}
