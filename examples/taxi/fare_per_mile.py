"""Python models beside the SQL ones: a pyarrow model that adds a column to a SQL model's
table, a pandas model that aggregates it, and an expectation that checks it."""

import quiver


@quiver.model()
@quiver.python("3.11", pip={"pandas": ""})
def fare_per_mile(trips=quiver.Model("long_trips", columns=["trip_id", "pickup_location_id", "trip_distance", "fare_amount"])):
    import pyarrow.compute as pc

    # A new column computed by pyarrow lands in the function's arena: handed on without a copy.
    return trips.append_column("fare_per_mile", pc.divide(trips["fare_amount"], trips["trip_distance"]))


@quiver.model(materialize=True)
@quiver.python("3.11", pip={"pandas": ""})
def priciest_zones(data=quiver.Model("fare_per_mile")):
    df = data.to_pandas()
    zones = df.groupby("pickup_location_id", as_index=False).agg(trips=("trip_id", "count"), fare_per_mile=("fare_per_mile", "mean"))
    return zones.nlargest(20, "fare_per_mile")


@quiver.expectation()
@quiver.python("3.11", pip={"pandas": ""})
def fares_are_positive(data=quiver.Model("fare_per_mile", filter="fare_per_mile <= 0")):
    # Long trips are well paid (long_trips.sql keeps fares above 60): no row may pass the filter.
    return data.num_rows == 0
