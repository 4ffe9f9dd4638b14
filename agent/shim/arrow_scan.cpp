// Registers Arrow tables that live in quiver's segments as DuckDB views, scanned in place.
//
// DuckDB 2.0's C API `duckdb_arrow_scan` registers with the `arrow_scan` table function, which
// pushes projections and filters down to the stream producer, but the C API's producer ignores
// them: `SELECT b FROM t` returns column a. This shim registers with `arrow_scan_dumb` (no
// pushdown; DuckDB projects and filters itself) and asks Rust for a fresh stream on every scan,
// so a view can be scanned any number of times (self-joins, CTEs used twice).
//
// It uses DuckDB's internal C++ API, so it is tied to the pinned DuckDB version, and it must be
// compiled with the same NDEBUG setting as libduckdb-sys (see build.rs).

#include "duckdb.h"
#include "duckdb.hpp"
#include "duckdb/function/table/arrow.hpp"

#include <cstring>
#include <exception>

namespace {

typedef void (*quiver_produce_fn)(void *table, ArrowArrayStream *out);
typedef void (*quiver_free_fn)(void *table);

// Owns the Rust table (through `free_table`) for as long as DuckDB keeps the view.
class QuiverArrowFactory final : public duckdb::ArrowScanFactory {
public:
	QuiverArrowFactory(void *table, quiver_produce_fn produce, quiver_free_fn free_table)
	    : table_(table), produce_(produce), free_table_(free_table) {
	}
	~QuiverArrowFactory() override {
		free_table_(table_);
	}

	void GetSchema(ArrowSchema &schema) override {
		ArrowArrayStream stream;
		produce_(table_, &stream);
		int rc = stream.get_schema(&stream, &schema);
		stream.release(&stream);
		if (rc != 0) {
			throw duckdb::InvalidInputException("quiver: the table's schema could not be exported");
		}
	}

	duckdb::unique_ptr<duckdb::ArrowArrayStreamWrapper> ProduceStream(duckdb::ArrowStreamParameters &) override {
		auto wrapper = duckdb::make_uniq<duckdb::ArrowArrayStreamWrapper>();
		produce_(table_, &wrapper->arrow_array_stream);
		return wrapper;
	}

private:
	void *table_;
	quiver_produce_fn produce_;
	quiver_free_fn free_table_;
};

} // namespace

// Creates or replaces view `view_name` over the table. Ownership of `table` always passes to
// this call: `free_table` runs when DuckDB drops the view, or here on failure.
extern "C" duckdb_state quiver_register_arrow(duckdb_connection connection, const char *view_name, void *table,
                                              quiver_produce_fn produce, quiver_free_fn free_table, char *err,
                                              size_t err_len) {
	duckdb::shared_ptr<QuiverArrowFactory> factory;
	try {
		factory = duckdb::make_shared_ptr<QuiverArrowFactory>(table, produce, free_table);
		auto conn = reinterpret_cast<duckdb::Connection *>(connection);
		conn->TableFunction("arrow_scan_dumb", {}, {}, factory)->CreateView(duckdb::Identifier(view_name), true, false);
	} catch (std::exception &e) {
		if (err && err_len) {
			strncpy(err, e.what(), err_len - 1);
			err[err_len - 1] = 0;
		}
		if (!factory) {
			free_table(table);
		}
		return DuckDBError;
	}
	return DuckDBSuccess;
}
