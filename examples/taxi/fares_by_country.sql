-- Average fare and tip by country of the card.
SELECT country, count(*) AS trips, avg(fare_amount) AS avg_fare, avg(tip_amount) AS avg_tip
FROM trips
GROUP BY country
