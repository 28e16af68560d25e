#include "quant/rans.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace aq {
namespace {

constexpr uint32_t kRansLow = 1u << 16;  // lower bound of the state interval
static_assert(kRansLanes == 4, "rans_decode unrolls four lanes");

}  // namespace

Result<FrequencyTable> normalize_frequencies(std::span<const uint64_t> counts) {
  if (counts.empty() || counts.size() > kMaxAlphabet)
    return Internal(StrCat("rANS alphabet of ", counts.size(), " symbols (1..", kMaxAlphabet, " supported)"));
  const uint64_t total = std::accumulate(counts.begin(), counts.end(), uint64_t{0});
  size_t present = 0;
  for (uint64_t c : counts) present += c ? 1 : 0;
  if (total == 0) return Internal("rANS: no symbols to model");
  if (present > kProbScale) return Internal("rANS: more distinct symbols than probability slots");

  FrequencyTable t;
  t.freq.assign(counts.size(), 0);
  // Every present symbol gets 1; the remaining slots are shared in proportion to the counts.
  const uint64_t spare = kProbScale - present;
  std::vector<std::pair<double, size_t>> remainders;
  uint64_t given = present;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (!counts[i]) continue;
    const double share = static_cast<double>(spare) * static_cast<double>(counts[i]) / static_cast<double>(total);
    const auto whole = static_cast<uint64_t>(std::floor(share));
    t.freq[i] = static_cast<uint16_t>(1 + whole);
    given += whole;
    remainders.emplace_back(share - static_cast<double>(whole), i);
  }
  std::sort(remainders.begin(), remainders.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (size_t k = 0; given < kProbScale; ++k, ++given) t.freq[remainders[k % remainders.size()].second] += 1;
  AQ_RETURN_IF_ERROR(finish_frequency_table(&t));
  return t;
}

Status finish_frequency_table(FrequencyTable* t) {
  if (t->freq.empty() || t->freq.size() > kMaxAlphabet)
    return FormatError(StrCat("frequency table of ", t->freq.size(), " symbols"));
  t->cum.assign(t->freq.size() + 1, 0);
  for (size_t i = 0; i < t->freq.size(); ++i) t->cum[i + 1] = t->cum[i] + t->freq[i];
  if (t->cum.back() != kProbScale)
    return FormatError(StrCat("frequencies sum to ", t->cum.back(), ", not ", kProbScale));
  t->slot_symbol.resize(kProbScale);
  t->slot_entry.resize(kProbScale);
  t->inverse.assign(t->freq.size(), 0.0);
  for (size_t i = 0; i < t->freq.size(); ++i) {
    if (t->freq[i]) t->inverse[i] = 1.0 / t->freq[i];
    for (uint32_t slot = t->cum[i]; slot < t->cum[i + 1]; ++slot) {
      t->slot_symbol[slot] = static_cast<uint16_t>(i);
      t->slot_entry[slot] = t->freq[i] | ((slot - t->cum[i]) << 16);
    }
  }
  return Status::OK();
}

void rans_encode(const FrequencyTable& t, std::span<const uint16_t> symbols, std::vector<uint8_t>* out) {
  // Words are produced last-symbol-first; collect them, then lay them out in decode order.
  thread_local std::vector<uint16_t> tls_words;
  std::vector<uint16_t>& words = tls_words;  // one TLS lookup, not one per word
  words.clear();
  words.reserve(symbols.size() + 8);  // at most one word per symbol
  uint32_t x[kRansLanes];
  for (auto& s : x) s = kRansLow;
  auto put = [&](uint32_t& st, uint16_t sym) {
    const uint32_t f = t.freq[sym];
    const uint64_t x_max = static_cast<uint64_t>((kRansLow >> kProbBits) << 16) * f;  // 2^32 when f = 2^15
    if (st >= x_max) {
      words.push_back(static_cast<uint16_t>(st & 0xffffu));
      st >>= 16;
    }
    // st / f through the reciprocal (exact after the correction: the double estimate is off by
    // at most one for st < 2^32)
    uint32_t q = static_cast<uint32_t>(static_cast<double>(st) * t.inverse[sym]);
    int64_t r = static_cast<int64_t>(st) - static_cast<int64_t>(q) * f;
    if (r < 0) --q, r += f;
    else if (r >= f) ++q, r -= f;
    st = (q << kProbBits) + static_cast<uint32_t>(r) + t.cum[sym];
  };
  size_t i = symbols.size();
  // the tail that is not a whole group of four, then four lanes at a time (independent chains)
  while (i % kRansLanes != 0) {
    --i;
    put(x[i % kRansLanes], symbols[i]);
  }
  while (i > 0) {
    i -= kRansLanes;
    put(x[3], symbols[i + 3]);
    put(x[2], symbols[i + 2]);
    put(x[1], symbols[i + 1]);
    put(x[0], symbols[i]);
  }
  const size_t base = out->size();
  out->resize(base + 4 * kRansLanes + 2 * words.size());
  uint8_t* p = out->data() + base;
  for (int l = 0; l < kRansLanes; ++l) {
    std::memcpy(p, &x[l], 4);  // little-endian hosts only (Linux x86-64 / aarch64)
    p += 4;
  }
  for (size_t k = words.size(); k-- > 0;) {
    std::memcpy(p, &words[k], 2);
    p += 2;
  }
}

Status rans_decode(const FrequencyTable& t, std::span<const uint8_t> data, std::span<uint16_t> symbols) {
  if (data.size() < 4 * kRansLanes) return FormatError(StrCat("rANS chunk of ", data.size(), " bytes"));
  uint32_t x[kRansLanes];
  for (int l = 0; l < kRansLanes; ++l) std::memcpy(&x[l], data.data() + 4 * l, 4);
  const uint8_t* p = data.data() + 4 * kRansLanes;
  const uint8_t* end = data.data() + data.size();
  const uint16_t* slot_symbol = t.slot_symbol.data();
  const uint32_t* slot_entry = t.slot_entry.data();
  const size_t n = symbols.size();
  auto step = [&](uint32_t& st, uint16_t& out) -> bool {
    const uint32_t slot = st & (kProbScale - 1);
    const uint32_t e = slot_entry[slot];
    out = slot_symbol[slot];
    st = (e & 0xffffu) * (st >> kProbBits) + (e >> 16);
    if (st < kRansLow) {
      if (p + 2 > end) return false;
      uint16_t w;
      std::memcpy(&w, p, 2);
      p += 2;
      st = (st << 16) | w;
    }
    return true;
  };
  size_t i = 0;
  for (; i + kRansLanes <= n; i += kRansLanes) {
    // one statement per lane: the lanes read their renormalization words in lane order
    bool ok = step(x[0], symbols[i]);
    ok = step(x[1], symbols[i + 1]) && ok;
    ok = step(x[2], symbols[i + 2]) && ok;
    ok = step(x[3], symbols[i + 3]) && ok;
    if (!ok) return FormatError("rANS chunk ends early");
  }
  for (; i < n; ++i)
    if (!step(x[i % kRansLanes], symbols[i])) return FormatError("rANS chunk ends early");
  return Status::OK();
}

double coded_bits(std::span<const uint64_t> counts, const FrequencyTable& t) {
  double bits = 0;
  for (size_t i = 0; i < counts.size(); ++i)
    if (counts[i]) bits += static_cast<double>(counts[i]) * (kProbBits - std::log2(static_cast<double>(t.freq[i])));
  return bits;
}

}  // namespace aq
