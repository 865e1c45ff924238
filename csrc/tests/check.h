// Minimal test harness for the C++ kernel tests: MMK_TEST(name) defines a test,
// MMK_CHECK(cond) records a failure; main() runs every test and returns non-zero on failure.
#pragma once

#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace mmk::testing {

struct TestCase {
  std::string name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Register {
  Register(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

// True if fn() throws (kernels reject bad input with TORCH_CHECK, a c10::Error).
template <typename Fn>
bool throws(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

}  // namespace mmk::testing

#define MMK_TEST(name)                                                    \
  static void name();                                                     \
  static ::mmk::testing::Register register_##name(#name, name);           \
  static void name()

#define MMK_CHECK(cond)                                                           \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++::mmk::testing::failures();                                               \
    }                                                                             \
  } while (0)

#define MMK_TEST_MAIN()                                                   \
  int main() {                                                            \
    for (auto& test : ::mmk::testing::registry()) {                      \
      const int before = ::mmk::testing::failures();                      \
      try {                                                               \
        test.body();                                                      \
      } catch (const std::exception& e) {                                 \
        std::fprintf(stderr, "%s: exception: %s\n", test.name.c_str(), e.what()); \
        ++::mmk::testing::failures();                                     \
      }                                                                   \
      std::printf("%s %s\n", ::mmk::testing::failures() == before ? "PASS" : "FAIL", test.name.c_str()); \
    }                                                                     \
    return ::mmk::testing::failures() == 0 ? 0 : 1;                       \
  }
