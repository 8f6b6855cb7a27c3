// GET /api/products/<random id>/stock: the cheapest read, answered from the cached product entry.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=30s -e PRODUCTS=10000 k6/stock.js
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000).
import { check } from 'k6';
import { OK_CACHED, STOCK, commonOptions, read, report } from './lib.js';

export const options = commonOptions();

export default function () {
  check(read(STOCK), OK_CACHED);
}

export function handleSummary(data) {
  return report(data, { script: 'stock' });
}
