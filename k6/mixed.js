// A mixed workload: 80% single-product reads (half /api/products/<id>, half .../stock), 15% list
// pages, 5% stock writes ({"delta": -1} 80% / {"delta": +1} 20%; 409 insufficient_stock is expected).
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=30s -e PRODUCTS=10000 k6/mixed.js
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000).
import http from 'k6/http';
import { check } from 'k6';
import { LIST, OK, PRODUCT, STOCK, WRITE } from './lib.js';
import { commonOptions, perTag, randomId, read, report, updateStock } from './lib.js';

const NAMES = [PRODUCT, STOCK, LIST, WRITE];

http.setResponseCallback(http.expectedStatuses(200, 409));

export const options = commonOptions({ thresholds: perTag('name', NAMES) });

export default function () {
  const r = Math.random();
  if (r < 0.4) {
    check(read(PRODUCT), OK);
  } else if (r < 0.8) {
    check(read(STOCK), OK);
  } else if (r < 0.95) {
    check(read(LIST), OK);
  } else {
    const res = updateStock(randomId(), { delta: Math.random() < 0.8 ? -1 : 1 });
    check(res, { 'write status is 200 or 409': (x) => x.status === 200 || x.status === 409 });
  }
}

export function handleSummary(data) {
  return report(data, { script: 'mixed', groups: NAMES });
}
