-- A join: how many of each busy zone's trips are long ones.
SELECT t.pickup_location_id, t.trips, count(l.trip_id) AS long_trips
FROM top_pickup_locations t
LEFT JOIN long_trips l ON l.pickup_location_id = t.pickup_location_id
GROUP BY t.pickup_location_id, t.trips
