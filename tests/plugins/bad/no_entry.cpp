// Refused: a shared library without the entry symbol.
extern "C" __attribute__((visibility("default"))) int not_a_tessera_plugin(void) { return 42; }
